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
