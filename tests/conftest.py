"""Shared test setup: a reusable cache for the tiny checkpoint and the loaded stages.

The environment is set at import time, before any test module imports Ray or builds a
config: `AppConfig` reads `VIDGEN_CACHE_DIR` when it is created, and Ray workers inherit
the environment of the process that starts Ray.
"""

from __future__ import annotations

import os
import tempfile
import uuid

# A fixed per-user directory: reruns reuse the tiny checkpoint built by the first run
# (the build is locked and atomic, so parallel runs are safe too).
os.environ.setdefault(
    "VIDGEN_CACHE_DIR",
    os.path.join(tempfile.gettempdir(), f"vidgen-test-cache-{os.getuid() if hasattr(os, 'getuid') else 'user'}"),
)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest  # noqa: E402

from vidgen_serve.config import AppConfig  # noqa: E402


@pytest.fixture(scope="session")
def tiny_config() -> AppConfig:
    """The default application config (profile `tiny`, cache dir from the environment)."""
    return AppConfig()


@pytest.fixture(scope="session")
def checkpoint(tiny_config: AppConfig) -> str:
    """Path of the tiny Wan checkpoint (built on first use, then reused)."""
    from vidgen_serve.models.loading import resolve_checkpoint

    return resolve_checkpoint(tiny_config)


@pytest.fixture(scope="session")
def pipeline(tiny_config: AppConfig, checkpoint: str):
    """The in-process pipeline (TextEncoder -> Denoiser -> Decoder), loaded once per session."""
    from vidgen_serve.pipeline import VideoPipeline

    return VideoPipeline(tiny_config)


def _top_level_boxes(path) -> list[str]:
    """Types of the top-level ISO-BMFF boxes of an MP4, in file order."""
    import struct

    boxes = []
    with open(path, "rb") as f:
        f.seek(0, 2)
        end = f.tell()
        pos = 0
        while pos + 8 <= end:
            f.seek(pos)
            size, kind = struct.unpack(">I4s", f.read(8))
            if size == 1:  # 64-bit size follows the type
                size = struct.unpack(">Q", f.read(8))[0]
            elif size == 0:  # box runs to the end of the file
                size = end - pos
            if size < 8:
                raise ValueError(f"corrupt box {kind!r} of size {size} at {pos}")
            boxes.append(kind.decode("latin-1"))
            pos += size
    return boxes


def _probe(path, decode: bool = True) -> dict:
    """What PyAV sees in an MP4: codec, pixel format, size, rate, frame count, duration, box order."""
    import av
    import numpy as np

    info: dict = {"boxes": _top_level_boxes(path)}
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        info.update(
            codec=stream.codec_context.name,
            pix_fmt=stream.codec_context.pix_fmt,
            width=stream.codec_context.width,
            height=stream.codec_context.height,
            fps=stream.average_rate,
            duration_s=float(stream.duration * stream.time_base) if stream.duration else None,
            container_duration_s=container.duration / 1e6 if container.duration else None,
        )
        if decode:
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
            info["frames"] = np.stack(frames) if frames else np.zeros((0,), np.uint8)
            info["num_frames"] = len(frames)
    return info


@pytest.fixture(scope="session")
def probe_mp4():
    """`probe_mp4(path, decode=True) -> dict` (codec, pix_fmt, width, height, fps, num_frames, frames, boxes...)."""
    return _probe


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint on loopback (moto's server mode), with test credentials in the
    standard AWS environment variables (the stores read the normal credential chain)."""
    from moto.server import ThreadedMotoServer

    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def bucket(s3_server):
    """A fresh bucket on the S3 server; returns its name."""
    import boto3

    name = f"vidgen-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


REDIS_URL = "redis://127.0.0.1:6379/0"  # the local server (CI runs one too)


@pytest.fixture
def redis_namespace():
    """A fresh job-store namespace on the local Redis; its keys (and only its keys) are
    deleted afterwards (the server is shared: never FLUSHDB)."""
    import redis

    namespace = f"test-{uuid.uuid4().hex[:12]}"
    yield namespace
    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{{{namespace}}}:*", count=500))
        if keys:
            client.delete(*keys)
    finally:
        client.close()
