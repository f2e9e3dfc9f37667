"""Fixtures of the parallel tests: one pool of rank processes shared by every multi-rank case."""

from __future__ import annotations

import pytest

from rank_pool import RankPool

#: Ranks in the shared pool: enough for the largest layout tested (tp*ulysses*cfg = 4).
POOL_SIZE = 4


@pytest.fixture(scope="session")
def rank_pool():
    """A `RankPool` of 4 spawned ranks; a case that breaks it gets a fresh one next time (`pool()`)."""
    holder = {"pool": None}

    def pool() -> RankPool:
        if holder["pool"] is None or holder["pool"].broken:
            holder["pool"] = RankPool(POOL_SIZE)
        return holder["pool"]

    yield pool
    if holder["pool"] is not None:
        holder["pool"].close()
