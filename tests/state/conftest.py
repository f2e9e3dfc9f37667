"""Job stores for the contract tests: SQLite on a temp file, Redis on the local server."""

from __future__ import annotations

import pytest

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(params=["sqlite", "redis"])
def make_store(request, tmp_path):
    """`make_store()` -> a new, not yet started store on the same backing data (one per "replica")."""
    from vidgen_serve.state.jobs import open_job_store

    if request.param == "sqlite":
        url, namespace = f"sqlite:///{tmp_path / 'jobs.sqlite3'}", "unused"
    else:
        url, namespace = REDIS_URL, request.getfixturevalue("redis_namespace")
    return lambda: open_job_store(url, tmp_path, namespace=namespace)
