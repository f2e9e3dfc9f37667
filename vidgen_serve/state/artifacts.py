"""Artifact stores: where finished MP4s live (a local directory, or S3 / an S3-compatible store).

The Decoder writes each job's MP4 here and returns its key; the ingress streams it back
(`GET .../content`, HTTP Range) or redirects to a presigned URL. Keys are derived from
server-generated job ids only (`<job id>.mp4`), never from user input. Every call is a
coroutine; blocking work (file I/O, boto3) runs on a worker thread.

A store is checked when it starts: a directory must be writable, a bucket must exist and
accept writes (a probe object is written and deleted), so a misconfigured store fails the
replica at start with a message naming it, not the first job.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator
from urllib.parse import urlsplit

from ..errors import VidgenError
from .jobs import JOB_ID_RE, StoreURLError

CHUNK_BYTES = 1 << 20
PROBE_NAME = ".vidgen-write-check"


class ArtifactUnavailable(VidgenError):
    """503: the artifact store refused or failed an operation (named in the message)."""

    def __init__(self, message: str):
        super().__init__(503, message, code="artifact_store_unavailable", headers={"Retry-After": "5"})


def artifact_key(job_id: str) -> str:
    """The key of a job's MP4 (validated: a job id is 32 hex digits)."""
    if not JOB_ID_RE.match(job_id):
        raise ValueError("invalid job id")
    return f"{job_id}.mp4"


def _check_key(key: str) -> str:
    if not (key.endswith(".mp4") and JOB_ID_RE.match(key[:-4])):
        raise ValueError(f"invalid artifact key {key[:40]!r}")
    return key


@dataclass
class ArtifactBody:
    """A (possibly partial) object read from a store, streamed in chunks."""

    status_code: int  # 200, or 206 for a satisfied Range
    headers: dict[str, str]
    chunks: AsyncIterator[bytes] = field(repr=False)


class ArtifactStore(ABC):
    """Where finished MP4s live."""

    #: The store's location (for messages and logs).
    url: str

    @abstractmethod
    async def start(self) -> None:
        """Check the store exists and accepts writes; raise `ArtifactUnavailable` naming it if not."""

    @abstractmethod
    async def put_file(self, key: str, path: str | os.PathLike) -> None:
        """Store the file at `path` under `key` (readers never see a partial object)."""

    @abstractmethod
    async def exists(self, key: str) -> bool:
        """Whether `key` is stored."""

    @abstractmethod
    async def delete(self, key: str) -> None:
        """Remove `key` (no error if absent)."""

    def local_path(self, key: str) -> Path | None:
        """The file behind `key` when the store is a local directory (served with sendfile), else None."""
        return None

    async def open(self, key: str, range_header: str | None = None) -> ArtifactBody | None:
        """Read `key` (the bytes `range_header` asks for, if any); None if it is not stored."""
        raise NotImplementedError

    async def presigned_url(self, key: str, expires_s: int = 900) -> str | None:
        """A URL a client can GET `key` from directly, or None if the store has none."""
        return None


class LocalArtifactStore(ArtifactStore):
    """MP4s in a local directory (the default: `<state_dir>/artifacts`)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.url = f"file://{self.root.resolve()}"

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    async def start(self) -> None:
        def _check() -> None:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f"{PROBE_NAME}-{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()

        try:
            await asyncio.to_thread(_check)
        except OSError as exc:
            raise ArtifactUnavailable(f"artifact_store {self.url} is not a writable directory: {exc}") from exc

    async def put_file(self, key: str, path: str | os.PathLike) -> None:
        target = self._path(key)

        def _put() -> None:
            # Copy next to the target, then rename: a reader never sees half a video.
            tmp = target.with_name(f"{target.name}.{uuid.uuid4().hex}.part")
            try:
                shutil.copyfile(path, tmp)
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)

        try:
            await asyncio.to_thread(_put)
        except OSError as exc:
            raise ArtifactUnavailable(f"storing {key} in {self.url} failed: {exc}") from exc

    async def exists(self, key: str) -> bool:
        return await asyncio.to_thread(self._path(key).is_file)

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self._path(key).unlink, True)

    def local_path(self, key: str) -> Path | None:
        return self._path(key)


class S3ArtifactStore(ArtifactStore):
    """MP4s in an S3 bucket (or an S3-compatible store through `endpoint_url`), via boto3.

    Credentials come from the standard AWS chain (environment, shared files, instance or
    pod identity). Args:
        bucket: the bucket.
        prefix: key prefix inside the bucket ("" or ending in "/").
        endpoint_url: an S3-compatible endpoint (MinIO, Ceph, R2, ...), or None for AWS.
        region: the region, or None for the chain's default.
    """

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None, region: str | None = None):
        self.bucket = bucket
        self.prefix = prefix
        self.endpoint_url = endpoint_url
        self.region = region
        self.url = f"s3://{bucket}/{prefix}" + (f" at {endpoint_url}" if endpoint_url else "")
        self._client: Any = None

    def _object(self, key: str) -> str:
        return self.prefix + _check_key(key)

    def _make_client(self) -> Any:
        import boto3
        from botocore.config import Config

        config = Config(
            retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=60,
            signature_version="s3v4",
            # S3-compatible stores are usually addressed by path (no per-bucket DNS names).
            s3={"addressing_style": "path" if self.endpoint_url else "auto"},
        )
        return boto3.session.Session().client("s3", endpoint_url=self.endpoint_url, region_name=self.region,
                                              config=config)

    def _explain(self, exc: Exception, doing: str) -> ArtifactUnavailable:
        from botocore.exceptions import ClientError

        if isinstance(exc, ClientError):
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchBucket"):
                return ArtifactUnavailable(f"{doing} {self.url}: the bucket {self.bucket!r} does not exist")
            if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                return ArtifactUnavailable(f"{doing} {self.url}: access denied ({code})")
            return ArtifactUnavailable(f"{doing} {self.url}: {code or exc}")
        return ArtifactUnavailable(f"{doing} {self.url}: {type(exc).__name__}: {exc}")

    async def start(self) -> None:
        def _check() -> None:
            self._client = self._make_client()
            self._client.head_bucket(Bucket=self.bucket)
            probe = f"{self.prefix}{PROBE_NAME}-{uuid.uuid4().hex}"
            self._client.put_object(Bucket=self.bucket, Key=probe, Body=b"")
            self._client.delete_object(Bucket=self.bucket, Key=probe)

        try:
            await asyncio.to_thread(_check)
        except Exception as exc:  # noqa: BLE001 - any failure here is a misconfigured store
            raise self._explain(exc, "artifact_store") from exc

    async def put_file(self, key: str, path: str | os.PathLike) -> None:
        obj = self._object(key)
        try:
            # upload_file is multipart for large files; an object appears only when complete.
            await asyncio.to_thread(self._client.upload_file, str(path), self.bucket, obj,
                                    ExtraArgs={"ContentType": "video/mp4"})
        except Exception as exc:  # noqa: BLE001
            raise self._explain(exc, f"storing {key} in") from exc

    async def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            await asyncio.to_thread(self._client.head_object, Bucket=self.bucket, Key=self._object(key))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise self._explain(exc, f"reading {key} from") from exc
        return True

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self._client.delete_object, Bucket=self.bucket, Key=self._object(key))

    async def open(self, key: str, range_header: str | None = None) -> ArtifactBody | None:
        from botocore.exceptions import ClientError

        # The client's Range header goes to S3 as it is: S3 answers 206 + Content-Range, or
        # InvalidRange (416) for an unsatisfiable one.
        kwargs = {"Bucket": self.bucket, "Key": self._object(key)}
        if range_header:
            kwargs["Range"] = range_header
        try:
            response = await asyncio.to_thread(self._client.get_object, **kwargs)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code in ("NoSuchKey", "404"):
                return None
            if code == "InvalidRange":
                raise VidgenError(416, f"range {range_header[:64]!r} not satisfiable", code="range_not_satisfiable",
                                  headers={"Content-Range": "bytes */*"}) from None
            raise self._explain(exc, f"reading {key} from") from exc
        headers = {"Content-Length": str(response["ContentLength"]), "Accept-Ranges": "bytes"}
        if response.get("ContentRange"):
            headers["Content-Range"] = response["ContentRange"]
        body = response["Body"]

        async def chunks() -> AsyncIterator[bytes]:
            try:
                while True:
                    chunk = await asyncio.to_thread(body.read, CHUNK_BYTES)
                    if not chunk:
                        return
                    yield chunk
            finally:
                body.close()

        return ArtifactBody(206 if "Content-Range" in headers else 200, headers, chunks())

    async def presigned_url(self, key: str, expires_s: int = 900) -> str | None:
        params = {"Bucket": self.bucket, "Key": self._object(key), "ResponseContentType": "video/mp4"}
        return await asyncio.to_thread(self._client.generate_presigned_url, "get_object", Params=params,
                                       ExpiresIn=expires_s)


def parse_artifact_store_url(url: str | None, state_dir: Path) -> tuple[str, str, str]:
    """("file", directory, "") or ("s3", bucket, prefix) for an `artifact_store` setting."""
    if url is None:
        return "file", str(state_dir / "artifacts"), ""
    parts = urlsplit(url)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path:
            raise StoreURLError(f"artifact_store {url!r}: use file:///path/to/dir")
        return "file", parts.path, ""
    if parts.scheme == "s3":
        bucket, prefix = parts.netloc, parts.path.lstrip("/")
        if not bucket:
            raise StoreURLError(f"artifact_store {url!r}: no bucket (use s3://bucket/prefix)")
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        return "s3", bucket, prefix
    raise StoreURLError(f"artifact_store {url!r}: unknown scheme {parts.scheme!r} "
                        "(allowed: file:///dir, s3://bucket/prefix)")


def open_artifact_store(url: str | None, state_dir: Path, *, s3_endpoint_url: str | None = None,
                        s3_region: str | None = None) -> ArtifactStore:
    """The artifact store an `artifact_store` setting names (not yet started: `await store.start()`)."""
    kind, where, prefix = parse_artifact_store_url(url, state_dir)
    if kind == "file":
        return LocalArtifactStore(where)
    return S3ArtifactStore(where, prefix, endpoint_url=s3_endpoint_url, region=s3_region)
