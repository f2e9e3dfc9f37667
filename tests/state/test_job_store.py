"""Contract tests of the job store, run against both backends (SQLite file, real Redis).

Two store instances on the same data stand for two ingress replicas. Concurrency is real
(many concurrent claims/recoveries through separate connections), and no test waits for
work to finish: the only sleeps let the clock pass a staleness threshold.
"""

from __future__ import annotations

import asyncio
import socket
import sqlite3

import pytest

from vidgen_serve.state.jobs import (CANCELLED, FAILED, OUT_OF_ATTEMPTS_ERROR, QUEUED, RECOVERED_ERROR, RUNNING,
                                     SUCCEEDED, StoreUnavailable, StoreURLError, open_job_store,
                                     parse_job_store_url)

PLAN = {"seed": 7, "num_inference_steps": 2}
REQUEST = {"prompt": "a fox"}


async def _started(make_store, n: int = 1):
    stores = [make_store() for _ in range(n)]
    for s in stores:
        await s.start()
    return stores


async def _closed(*stores) -> None:
    for s in stores:
        await s.close()


def test_create_get_list(make_store):
    async def body():
        (store,) = await _started(make_store)
        try:
            jobs = [await store.create(REQUEST, PLAN, "key-a") for _ in range(5)]
            other = await store.create(REQUEST, PLAN, "key-b")
            got = await store.get(jobs[0].id)
            assert got.state == QUEUED and got.request == REQUEST and got.plan == PLAN and got.key_id == "key-a"
            assert got.attempts == 0 and not got.cancel_requested and got.artifact is None
            assert await store.get("0" * 32) is None
            page1 = await store.list("key-a", limit=3)
            page2 = await store.list("key-a", limit=3, after=page1[-1].id)
            listed = [j.id for j in page1 + page2]
            assert listed == [j.id for j in reversed(jobs)]  # newest first, no overlap, nothing missing
            assert other.id not in listed
            assert (await store.counts()) == {QUEUED: 6, RUNNING: 0}
            assert await store.queue_depth() == 6
        finally:
            await _closed(store)

    asyncio.run(body())


def test_claim_is_atomic_across_replicas(make_store):
    async def body():
        a, b = await _started(make_store, 2)
        try:
            ids = {(await a.create(REQUEST, PLAN, "k")).id for _ in range(20)}
            # 40 concurrent claims of up to 2 jobs each, split between the two "replicas".
            results = await asyncio.gather(*[(a if i % 2 else b).claim(f"owner-{i % 2}", 2) for i in range(40)])
            claimed = [job.id for batch in results for job in batch]
            assert sorted(claimed) == sorted(ids)  # every job once, none twice
            for batch in results:
                for job in batch:
                    assert job.state == RUNNING and job.attempts == 1 and job.owner in ("owner-0", "owner-1")
            assert await a.claim("owner-0", 5) == []
            assert (await b.counts()) == {QUEUED: 0, RUNNING: 20}
        finally:
            await _closed(a, b)

    asyncio.run(body())


def test_claim_takes_oldest_first_and_skips_cancelled(make_store):
    async def body():
        (store,) = await _started(make_store)
        try:
            first, second, third = [await store.create(REQUEST, PLAN, "k") for _ in range(3)]
            cancelled = await store.cancel(first.id)
            assert cancelled.state == CANCELLED and cancelled.error == "cancelled by the client"
            got = await store.claim("me", 1)
            assert [j.id for j in got] == [second.id]
            assert [j.id for j in await store.claim("me", 5)] == [third.id]
            assert (await store.get(first.id)).state == CANCELLED
        finally:
            await _closed(store)

    asyncio.run(body())


def test_progress_and_finish_only_by_the_owner(make_store):
    async def body():
        a, b = await _started(make_store, 2)
        try:
            job = await a.create(REQUEST, PLAN, "k")
            assert not await a.update(job.id, "me", stage="denoise")  # not running yet
            (claimed,) = await a.claim("me", 1)
            assert await b.update(job.id, "me", stage="denoise", progress={"step": 1, "steps": 2})
            assert not await b.update(job.id, "someone-else", stage="decode")
            with pytest.raises(ValueError):
                await a.update(job.id, "me", state=SUCCEEDED)  # state moves only through transitions
            seen = await b.get(job.id)
            assert seen.stage == "denoise" and seen.progress == {"step": 1, "steps": 2}
            assert not await a.finish(job.id, "someone-else", SUCCEEDED, artifact="x.mp4")
            assert seen.quality == {}  # no metrics before the video exists
            quality = {"temporal_ssim": 0.9312, "temporal_psnr_db": 27.41, "flicker": 0.982}
            assert await a.finish(job.id, "me", SUCCEEDED, timings={"total": 1.5}, artifact=f"{job.id}.mp4",
                                  quality=quality)
            done = await b.get(job.id)
            assert done.state == SUCCEEDED and done.stage is None and done.timings == {"total": 1.5}
            assert done.quality == quality and done.public()["quality"] == quality
            assert done.artifact == f"{job.id}.mp4" and done.error is None
            assert not await a.finish(job.id, "me", FAILED, error="late")  # already final
            assert (await a.get(job.id)).state == SUCCEEDED
            assert (await a.counts())[RUNNING] == 0
        finally:
            await _closed(a, b)

    asyncio.run(body())


def test_a_record_from_before_quality_metrics_reads_as_empty(make_store):
    """Records written before jobs had `quality` (no column / no hash field) still load, and finish."""
    async def body():
        (store,) = await _started(make_store)
        try:
            job = await store.create(REQUEST, PLAN, "k")
            if store.url.startswith("sqlite"):
                await store.close()
                with sqlite3.connect(store.path) as conn:
                    conn.execute("ALTER TABLE jobs DROP COLUMN quality")
                (store,) = await _started(make_store)  # adds the column back, empty
            else:
                await store._redis.hdel(store._job_key(job.id), "quality")
            assert (await store.get(job.id)).quality == {}
            (claimed,) = await store.claim("me", 1)
            assert await store.finish(job.id, "me", SUCCEEDED, quality={"flicker": 0.99})
            assert (await store.get(job.id)).quality == {"flicker": 0.99}
        finally:
            await _closed(store)

    asyncio.run(body())


def test_heartbeat_keeps_a_job_and_recovery_resumes_it_once(make_store):
    async def body():
        a, b, c = await _started(make_store, 3)
        try:
            job = await a.create(REQUEST, PLAN, "k")
            (claimed,) = await a.claim("owner-a", 1)
            await asyncio.sleep(0.3)
            assert await a.heartbeat("owner-a", [job.id, "f" * 32]) == {job.id}
            beat = await a.get(job.id)
            assert beat.heartbeat_at - claimed.heartbeat_at >= 0.25
            assert await b.recover_stale(3600, max_attempts=2) == ([], [])  # alive: nothing recovered
            await asyncio.sleep(0.1)  # owner-a goes silent past the 0.05 s threshold below
            # Both other replicas race to recover it: exactly one does.
            results = await asyncio.gather(*[(b if i % 2 else c).recover_stale(0.05, 2) for i in range(10)])
            requeued = [jid for r, _ in results for jid in r]
            assert requeued == [job.id]
            resumed = await b.get(job.id)
            assert resumed.state == QUEUED and resumed.owner is None and resumed.error == RECOVERED_ERROR
            assert resumed.plan == PLAN  # resumed from its plan: same seed
            # The silent owner lost it: its heartbeat, progress and finish are refused.
            assert await a.heartbeat("owner-a", [job.id]) == set()
            assert not await a.update(job.id, "owner-a", stage="decode")
            (again,) = await c.claim("owner-c", 1)
            assert again.id == job.id and again.attempts == 2
            assert not await a.finish(job.id, "owner-a", SUCCEEDED, artifact="stale.mp4")
            # Out of attempts (2 of 2): the next recovery fails it with the reason.
            await asyncio.sleep(0.1)
            assert await b.recover_stale(0.05, 2) == ([], [job.id])
            failed = await c.get(job.id)
            assert failed.state == FAILED and failed.error == OUT_OF_ATTEMPTS_ERROR and failed.artifact is None
            assert (await c.counts()) == {QUEUED: 0, RUNNING: 0}
        finally:
            await _closed(a, b, c)

    asyncio.run(body())


def test_cancel_flags_a_running_job_for_its_owner(make_store):
    async def body():
        a, b = await _started(make_store, 2)
        try:
            job = await a.create(REQUEST, PLAN, "k")
            other = await a.create(REQUEST, PLAN, "k")
            await a.claim("owner-a", 2)
            assert await a.cancel_requested([job.id, other.id]) == set()
            flagged = await b.cancel(job.id)  # through the other replica
            assert flagged.state == RUNNING and flagged.cancel_requested
            assert await a.cancel_requested([job.id, other.id]) == {job.id}
            assert await a.finish(job.id, "owner-a", CANCELLED, error="cancelled by the client")
            assert (await b.get(job.id)).state == CANCELLED
            final = await b.cancel(job.id)  # final jobs stay as they are
            assert final.state == CANCELLED
            assert await b.cancel("0" * 32) is None
            # Only ended jobs can be deleted; then they are gone from lookups and listings.
            assert not await a.delete(other.id)  # still running
            assert await a.delete(job.id) and not await a.delete(job.id)
            assert await b.get(job.id) is None
            assert [j.id for j in await b.list("k")] == [other.id]
        finally:
            await _closed(a, b)

    asyncio.run(body())


def test_urls():
    from pathlib import Path

    assert parse_job_store_url(None, Path("var")) == ("sqlite", "var/jobs.sqlite3")
    assert parse_job_store_url("sqlite:///tmp/j.db", Path("var")) == ("sqlite", "tmp/j.db")
    assert parse_job_store_url("sqlite:////abs/j.db", Path("var")) == ("sqlite", "/abs/j.db")
    assert parse_job_store_url("redis://h:6379/2", Path("var")) == ("redis", "redis://h:6379/2")
    for bad in ("postgres://h/db", "redis://:6379/0", "redis://h:port/0", "redis://h:6379/x", "sqlite://", "jobs.db"):
        with pytest.raises(StoreURLError, match="job_store"):
            parse_job_store_url(bad, Path("var"))
    with pytest.raises(StoreURLError) as info:
        parse_job_store_url("redis://user:s3cret@h:port/0", Path("var"))
    assert "s3cret" not in str(info.value)


def test_unreachable_stores_fail_at_start_naming_them(tmp_path):
    async def body():
        with socket.socket() as sock:  # a port nothing listens on
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        store = open_job_store(f"redis://:pw@127.0.0.1:{port}/0", tmp_path)
        with pytest.raises(StoreUnavailable) as info:
            await store.start()
        assert f"127.0.0.1:{port}" in info.value.message and "pw" not in info.value.message
        assert info.value.status_code == 503
        blocker = tmp_path / "file"
        blocker.write_text("not a directory")
        store = open_job_store(f"sqlite:///{blocker}/jobs.sqlite3", tmp_path)
        with pytest.raises(StoreUnavailable, match="jobs.sqlite3"):
            await store.start()

    asyncio.run(body())
