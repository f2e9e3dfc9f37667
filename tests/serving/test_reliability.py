"""Reliability of the job path with the real stores: two ingress replicas on one Redis, a
replica SIGKILLed with 4 running jobs, a Redis restart under load, and overload shedding.

Replicas here are real `Ingress` objects (app, routes, job runner, store connections) over
fake stages, in this process or in child processes; work is held with events or a Redis
key, never timed. The figures (shedding latency, event-loop stalls) are measured by
benchmarks/state_reliability.py, not asserted here.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fake_handles import VIDEO, ingress_app

from vidgen_serve.net import find_free_port
from vidgen_serve.serving.settings import ServeSettings
from vidgen_serve.state.jobs import CANCELLED, QUEUED, RUNNING, SUCCEEDED, open_job_store

REDIS_URL = "redis://127.0.0.1:6379/0"
KEY = "k-one"
AUTH = {"Authorization": f"Bearer {KEY}"}
SMALL = {"prompt": "a red fox", "duration": 1, "resolution": "480p", "num_inference_steps": 2}
HERE = Path(__file__).parent


@pytest.fixture(autouse=True)
def _keys(monkeypatch):
    monkeypatch.setenv("VIDGEN_API_KEYS", KEY)


@pytest.fixture
def namespace(redis_namespace):
    return redis_namespace


async def _until(check, what: str, timeout_s: float = 60):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = await check()
        if result:
            return result
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_two_replicas_share_jobs_and_cancel_while_decoding(tmp_path, namespace):
    async def body():
        decoding, release = asyncio.Event(), asyncio.Event()

        async def hold_decode():
            decoding.set()
            await release.wait()

        common = dict(state_dir=tmp_path, job_store=REDIS_URL, job_store_namespace=namespace, job_heartbeat_s=0.2)
        # Replica one runs jobs; replica two only accepts (max_running_jobs=0): every job
        # submitted through two runs on one.
        async with ingress_app(ServeSettings(**common, max_running_jobs=1), before_store=hold_decode) as (one, _), \
                ingress_app(ServeSettings(**common, max_running_jobs=0)) as (two, _):
            r = await two.post("/v1/video/jobs", json=SMALL, headers=AUTH)
            assert r.status_code == 202, r.text
            job_id = r.json()["job_id"]
            seen = await one.get(f"/v1/video/jobs/{job_id}", headers=AUTH)  # at once, through the other
            assert seen.status_code == 200 and seen.json()["state"] in (QUEUED, RUNNING)
            await asyncio.wait_for(decoding.wait(), 30)
            running = (await two.get(f"/v1/video/jobs/{job_id}", headers=AUTH)).json()
            assert running["state"] == RUNNING and running["stage"] == "decode"
            cancel = await two.delete(f"/v1/video/jobs/{job_id}", headers=AUTH)
            assert cancel.status_code == 202, cancel.text

            async def cancelled():
                states = [(await c.get(f"/v1/video/jobs/{job_id}", headers=AUTH)).json()["state"] for c in (one, two)]
                return states == [CANCELLED, CANCELLED]

            await _until(cancelled, "the cancel to stop the decode on replica one")
            assert not release.is_set()  # it stopped mid-decode: the held decode never finished
            for client in (one, two):
                content = await client.get(f"/v1/video/jobs/{job_id}/content", headers=AUTH)
                assert content.status_code == 410 and content.json()["error"]["code"] == "job_cancelled"  # never will have content

    asyncio.run(body())


def test_sigkill_of_a_replica_with_four_running_jobs(tmp_path, namespace):
    import redis

    from replica_process import frames_for

    control = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    prefix = f"{{{namespace}}}:test:"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}

    def replica(owner: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, str(HERE / "replica_process.py"), REDIS_URL, namespace,
                                 str(tmp_path), owner, "4"], env=env, stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        return proc

    async def body():
        store = open_job_store(REDIS_URL, tmp_path, namespace=namespace)
        await store.start()
        plan_of = {}
        from vidgen_serve.config import AppConfig
        from vidgen_serve.plan import build_plan
        from vidgen_serve.request import parse_request

        for seed in (11, 12, 13, 14):
            plan = build_plan(parse_request({**SMALL, "seed": seed}), AppConfig())
            job = await store.create({}, plan.model_dump(mode="json"), KEY)
            plan_of[job.id] = seed
        a = replica("replica-a")
        b = None
        try:
            # All four running on A, each held inside its denoise.
            await _until(lambda: _async(control.llen(prefix + "started") == 4), "A to start four jobs")
            assert {(await store.get(j)).owner for j in plan_of} == {"replica-a"}
            b = replica("replica-b")
            a.send_signal(signal.SIGKILL)
            a.wait(timeout=30)
            # B notices the silent owner, resumes every job from its plan and holds them again.
            await _until(lambda: _async(control.llen(prefix + "started") == 8), "B to resume all four", 90)
            control.set(prefix + "release", "1")

            async def all_final():
                jobs = [await store.get(j) for j in plan_of]
                return all(j.state == SUCCEEDED for j in jobs) and jobs

            jobs = await _until(all_final, "every job to succeed", 90)
        finally:
            for proc in (a, b):
                if proc is not None and proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=30)
        starts = control.lrange(prefix + "started", 0, -1)
        stored = control.lrange(prefix + "stored", 0, -1)
        assert sorted(s for s in starts if s.startswith("replica-a")) == [f"replica-a:{s}" for s in (11, 12, 13, 14)]
        assert sorted(stored) == [f"replica-b:{s}" for s in (11, 12, 13, 14)]  # each stored once, by B
        for job in jobs:
            assert job.owner == "replica-b" and job.attempts == 2 and job.error is None
            seed = plan_of[job.id]
            assert job.plan["seed"] == seed  # resumed from its plan: same seed, same frames
            assert (tmp_path / "artifacts" / job.artifact).read_bytes() == frames_for(seed)
        assert await store.counts() == {QUEUED: 0, RUNNING: 0}
        await store.close()

    asyncio.run(body())
    control.close()


async def _async(value):
    return value


class OwnRedis:
    """A redis-server of this test's own (loopback, free port, append-only file so a restart
    keeps every write): restarting it disturbs nobody else."""

    def __init__(self, workdir: Path):
        self.port = find_free_port()
        self.dir = workdir
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        deadline = time.monotonic() + 30
        while True:
            try:
                if redis.Redis(port=self.port, socket_connect_timeout=0.5).ping():
                    return
            except redis.exceptions.RedisError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


def test_redis_restart_mid_load(tmp_path):
    server = OwnRedis(tmp_path)
    server.start()

    async def body():
        gate = asyncio.Event()
        gate.set()
        settings = ServeSettings(state_dir=tmp_path, job_store=server.url, job_heartbeat_s=0.2,
                                 job_stale_after_s=30, max_running_jobs=2)
        async with ingress_app(settings, before_store=gate.wait) as (client, _):
            async def submit():
                r = await client.post("/v1/video/jobs", json=SMALL, headers=AUTH)
                assert r.status_code == 202, r.text
                return r.json()["job_id"]

            async def state(job_id):
                return (await client.get(f"/v1/video/jobs/{job_id}", headers=AUTH)).json()["state"]

            finished = [await submit() for _ in range(3)]
            for job_id in finished:
                await _until(lambda: _eq(state(job_id), SUCCEEDED), "the first jobs to finish")
            gate.clear()
            held = [await submit() for _ in range(2)]
            for job_id in held:
                await _until(lambda: _eq(state(job_id), RUNNING), "two jobs to run")

            server.stop()  # Redis goes away with two jobs running
            during = [await client.get(f"/v1/video/jobs/{held[0]}", headers=AUTH),
                      await client.post("/v1/video/jobs", json=SMALL, headers=AUTH)]
            for r in during:
                assert r.status_code == 503, r.text
                assert r.json()["error"]["code"] == "store_unavailable"
                assert int(r.headers["retry-after"]) >= 1
            server.start()  # back, same data; the ingress is not restarted
            gate.set()
            for job_id in finished + held:
                await _until(lambda: _eq(state(job_id), SUCCEEDED), "every job to succeed after the restart")
            for job_id in finished:  # nothing finished before the outage was lost
                content = await client.get(f"/v1/video/jobs/{job_id}/content", headers=AUTH)
                assert content.status_code == 200 and content.content == VIDEO
            after = await client.post("/v1/video/jobs", json=SMALL, headers=AUTH)
            assert after.status_code == 202

    try:
        asyncio.run(body())
    finally:
        server.stop()


async def _eq(awaitable, value) -> bool:
    return (await awaitable) == value


def test_overload_on_the_sync_endpoint_is_shed_with_retry_after(tmp_path):
    async def body():
        inside, release = asyncio.Semaphore(0), asyncio.Event()

        async def held_decode(plan, latents, carrier):
            inside.release()
            await release.wait()
            return b"MP4" + str(latents).encode(), {"vae_decode": 0.01, "encode": 0.01}

        settings = ServeSettings(state_dir=tmp_path, max_inflight_sync=2)
        async with ingress_app(settings, decode=held_decode) as (client, _):
            accepted = [asyncio.create_task(client.post("/v1/video/generate", json={**SMALL, "seed": i},
                                                        headers=AUTH)) for i in range(2)]
            for _ in range(2):
                await asyncio.wait_for(inside.acquire(), 30)
            # 10x the capacity arrives while both slots are busy: every excess one is refused.
            excess = await asyncio.gather(*[client.post("/v1/video/generate", json=SMALL, headers=AUTH)
                                            for _ in range(18)])
            for r in excess:
                assert r.status_code == 429 and r.json()["error"]["code"] == "overloaded"
                assert int(r.headers["retry-after"]) == settings.retry_after_s
            release.set()
            for r in await asyncio.gather(*accepted):
                assert r.status_code == 200 and r.content.startswith(b"MP4")

    asyncio.run(body())
