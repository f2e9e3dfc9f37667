"""Job stores for the contract tests: SQLite on a temp file, Redis on the local server.

Each Redis test gets its own key namespace and deletes only its own keys afterwards.
"""

from __future__ import annotations

import uuid

import pytest

REDIS_URL = "redis://127.0.0.1:6379/0"


def delete_namespace(url: str, namespace: str) -> None:
    """Delete the keys of one test namespace (never FLUSHDB: the server is shared)."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{{{namespace}}}:*", count=500))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture(params=["sqlite", "redis"])
def make_store(request, tmp_path):
    """`make_store()` -> a new, not yet started store on the same backing data (one per "replica")."""
    from vidgen_serve.state.jobs import open_job_store

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'jobs.sqlite3'}"
        namespace = "unused"
    else:
        url = REDIS_URL
        namespace = f"test-{uuid.uuid4().hex[:12]}"
    yield lambda: open_job_store(url, tmp_path, namespace=namespace)
    if request.param == "redis":
        delete_namespace(url, namespace)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint on loopback (moto's server mode), with test credentials in the
    standard AWS environment variables (the stores read the normal credential chain)."""
    import os

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
