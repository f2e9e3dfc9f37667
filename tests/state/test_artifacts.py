"""Artifact stores: a local directory, and S3 against a real endpoint on loopback (moto server)."""

from __future__ import annotations

import asyncio
import json
import uuid

import boto3
import httpx
import pytest

from vidgen_serve.errors import VidgenError
from vidgen_serve.state.artifacts import (ArtifactUnavailable, LocalArtifactStore, S3ArtifactStore, artifact_key,
                                          open_artifact_store, parse_artifact_store_url)
from vidgen_serve.state.jobs import StoreURLError

DATA = bytes(range(256)) * 40  # 10240 bytes


async def _read(body) -> bytes:
    return b"".join([chunk async for chunk in body.chunks])


def test_local_store_round_trip(tmp_path):
    async def body():
        store = LocalArtifactStore(tmp_path / "artifacts")
        await store.start()
        src = tmp_path / "video.mp4"
        src.write_bytes(DATA)
        key = artifact_key(uuid.uuid4().hex)
        assert not await store.exists(key)
        await store.put_file(key, src)
        assert await store.exists(key)
        assert store.local_path(key).read_bytes() == DATA
        assert [p.name for p in (tmp_path / "artifacts").iterdir()] == [key]  # no probe or part files left
        await store.delete(key)
        assert not await store.exists(key)
        for bad in ("../etc/passwd", "x.mp4", f"{'a' * 32}.txt"):
            with pytest.raises(ValueError):
                store.local_path(bad)
        with pytest.raises(ValueError):
            artifact_key("../../x")

    asyncio.run(body())


def test_local_store_that_cannot_be_written_fails_at_start(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ArtifactUnavailable, match="not a writable directory") as info:
        asyncio.run(LocalArtifactStore(blocker / "artifacts").start())
    assert str(blocker) in info.value.message


def test_s3_store_round_trip_range_and_presigned_url(s3_server, bucket, tmp_path):
    async def body():
        store = open_artifact_store(f"s3://{bucket}/videos", tmp_path, s3_endpoint_url=s3_server,
                                    s3_region="us-east-1")
        assert isinstance(store, S3ArtifactStore) and store.prefix == "videos/"
        await store.start()
        src = tmp_path / "video.mp4"
        src.write_bytes(DATA)
        key = artifact_key(uuid.uuid4().hex)
        assert not await store.exists(key)
        assert await store.open(key) is None
        await store.put_file(key, src)
        assert await store.exists(key)
        listed = boto3.client("s3", endpoint_url=s3_server).list_objects_v2(Bucket=bucket)["Contents"]
        assert [o["Key"] for o in listed] == [f"videos/{key}"]  # the write probe was removed

        whole = await store.open(key)
        assert whole.status_code == 200 and whole.headers["Content-Length"] == str(len(DATA))
        assert await _read(whole) == DATA
        part = await store.open(key, "bytes=100-199")
        assert part.status_code == 206 and part.headers["Content-Range"] == f"bytes 100-199/{len(DATA)}"
        assert await _read(part) == DATA[100:200]
        with pytest.raises(VidgenError) as info:
            await store.open(key, f"bytes={len(DATA) + 10}-")
        assert info.value.status_code == 416

        url = await store.presigned_url(key, expires_s=60)
        assert url.startswith(f"{s3_server}/{bucket}/videos/{key}?") and "Signature" in url
        async with httpx.AsyncClient(trust_env=False) as client:
            got = await client.get(url)
        assert got.status_code == 200 and got.content == DATA

    asyncio.run(body())


def test_s3_bucket_that_does_not_exist_fails_at_start(s3_server, tmp_path):
    store = open_artifact_store("s3://no-such-vidgen-bucket/x", tmp_path, s3_endpoint_url=s3_server)
    with pytest.raises(ArtifactUnavailable, match="the bucket 'no-such-vidgen-bucket' does not exist") as info:
        asyncio.run(store.start())
    assert info.value.status_code == 503


def test_s3_bucket_that_denies_writes_fails_at_start(s3_server, bucket, tmp_path, monkeypatch):
    """Credentials that may read the bucket but not write to it (moto enforces IAM once asked)."""
    iam = boto3.client("iam", endpoint_url=s3_server)
    user = f"reader-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    iam.put_user_policy(UserName=user, PolicyName="read-only", PolicyDocument=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"},
                      {"Effect": "Deny", "Action": "s3:PutObject", "Resource": "*"}]}))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    httpx.post(f"{s3_server}/moto-api/reset-auth", content=b"0", trust_env=False).raise_for_status()
    try:
        store = open_artifact_store(f"s3://{bucket}/", tmp_path, s3_endpoint_url=s3_server)
        with pytest.raises(ArtifactUnavailable, match="access denied") as info:
            asyncio.run(store.start())
        assert bucket in info.value.message
    finally:
        httpx.post(f"{s3_server}/moto-api/reset-auth", content=b"inf", trust_env=False).raise_for_status()


def test_s3_upload_failure_names_the_store(s3_server, bucket, tmp_path):
    async def body():
        store = open_artifact_store(f"s3://{bucket}/", tmp_path, s3_endpoint_url=s3_server)
        await store.start()
        boto3.client("s3", endpoint_url=s3_server).delete_bucket(Bucket=bucket)  # gone after the start check
        src = tmp_path / "video.mp4"
        src.write_bytes(DATA)
        key = artifact_key(uuid.uuid4().hex)
        with pytest.raises(ArtifactUnavailable, match=f"storing {key} in s3://{bucket}/") as info:
            await store.put_file(key, src)
        assert "does not exist" in info.value.message

    asyncio.run(body())


def test_artifact_urls(tmp_path):
    assert parse_artifact_store_url(None, tmp_path) == ("file", str(tmp_path / "artifacts"), "")
    assert parse_artifact_store_url("file:///data/videos", tmp_path) == ("file", "/data/videos", "")
    assert parse_artifact_store_url("s3://b/p/q", tmp_path) == ("s3", "b", "p/q/")
    assert parse_artifact_store_url("s3://b", tmp_path) == ("s3", "b", "")
    for bad in ("s3:///p", "gs://b/p", "file://host/dir", "/data/videos"):
        with pytest.raises(StoreURLError, match="artifact_store"):
            parse_artifact_store_url(bad, tmp_path)
