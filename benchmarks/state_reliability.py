"""Reliability figures of the serving core on the real application (tiny profile, loopback).

One run starts a private redis-server (free port, append-only file: a restart keeps every
write) and a local Ray cluster, deploys the application with `job_store` on that Redis,
and measures:
  (1) 10x overload on the sync endpoint: with `max_inflight_sync` requests running, ten
      times as many arrive at once; every excess one must be answered 429/503 with
      Retry-After. Prints the rejection latency p50/p99 (goal p99 < 100 ms) and that the
      accepted ones complete.
  (2) the ingress event loop's longest stall during a load run (async submissions, polls,
      sync generations), from the replica's loop-lag probe (`GET /v1/admin/event-loop`;
      goal < 50 ms).
(1) and (2a) hold the generations with the Denoiser's fault injection (`extra_latency_s`:
an await, no CPU), so they measure the serving path itself; (2b) repeats the load run with
real generations, which on a 2-core machine starve every process of CPU (the figure then
shows that starvation, not code blocking the loop).
  (3) Redis restarted mid-load: requests in flight get 503 + Retry-After, the service
      recovers without a restart, and no finished job is lost.
The two-replica, SIGKILL and cancel-while-decoding figures are asserted by
tests/serving/test_reliability.py.

    .venv/bin/python benchmarks/state_reliability.py [--jobs 12] [--load-s 20]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("VIDGEN_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"vidgen-test-cache-{os.getuid()}"))

from vidgen_serve.front_door import INGRESS_KINDS, ingress_env  # noqa: E402 - after the environment is set
from vidgen_serve.net import find_free_port  # noqa: E402

KEY, ADMIN = "bench-key", "bench-admin"
AUTH = {"Authorization": f"Bearer {KEY}"}
SMALL = {"prompt": "a lighthouse at dusk", "duration": 1, "resolution": "480p", "num_inference_steps": 2}
HEAVY = {"prompt": "a sailing boat on a calm sea", "duration": 5, "resolution": "480p", "num_inference_steps": 20}
INFLIGHT = 2


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


class RedisServer:
    def __init__(self, workdir: str):
        self.port, self.dir, self.proc = find_free_port(), workdir, None

    def start(self) -> None:
        import redis

        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
             "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while True:
            try:
                if redis.Redis(port=self.port, socket_connect_timeout=0.5).ping():
                    return
            except redis.exceptions.RedisError:
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


async def load(base: str, job_ids: list[str], seconds: float) -> tuple[int, list[int]]:
    """The load run's traffic for `seconds`: 4 pollers of `job_ids` as fast as answers come, and 2
    sync generations one after the other. aiohttp on one event loop: the client shares the cores
    with the service, and a thread pool of httpx clients spent a large share of them itself.
    Returns (polls answered, the sync calls' statuses)."""
    import aiohttp

    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession(base_url=base, headers=AUTH,
                                     timeout=aiohttp.ClientTimeout(total=600)) as session:
        async def poll() -> int:
            n = 0
            while time.monotonic() < deadline:
                for job_id in job_ids:
                    async with session.get(f"/v1/video/jobs/{job_id}") as r:
                        await r.read()
                    n += 1
            return n

        async def sync() -> list[int]:
            codes = []
            for _ in range(2):
                async with session.post("/v1/video/generate", json=SMALL) as r:
                    await r.read()
                    codes.append(r.status)
            return codes

        results = await asyncio.gather(*(poll() for _ in range(4)), sync())
    return sum(results[:4]), results[4]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=12, help="async jobs in the load run")
    parser.add_argument("--load-s", type=float, default=20, help="seconds of polling load")
    parser.add_argument("--worker-niceness", type=int, nargs="+", default=[0],
                        help="Ray's worker_niceness (default 0, as `vidgen-serve serve` and k8s/base/env.yaml start "
                        "Ray; -1: Ray's default, 15: every replica and the proxy run that much "
                        "nicer than this process; 0: at this process's priority); several values: measured one after the other, each "
                        "on a fresh cluster")
    parser.add_argument("--ingress", choices=INGRESS_KINDS, default="haproxy",
                        help="front door of the served graph (default haproxy, as `vidgen-serve serve` runs)")
    parser.add_argument("--stop-after", choices=("1", "2a", "2b", "3"), default="3",
                        help="stop after this figure (e.g. 2a: the overload and held-generations figures only)")
    args = parser.parse_args()

    os.environ["VIDGEN_API_KEYS"], os.environ["VIDGEN_ADMIN_KEYS"] = KEY, ADMIN
    for niceness in args.worker_niceness:
        print(f"=== Ray worker_niceness: {'Ray default (15)' if niceness < 0 else niceness}; this process's "
              f"niceness {os.nice(0)}")
        run_once(args, niceness)


def run_once(args, worker_niceness: int) -> None:
    import httpx
    import ray
    from ray import serve

    from vidgen_serve.serve import compose_app

    work = tempfile.mkdtemp(prefix="vidgen-reliability-")
    redis_server = RedisServer(work)
    redis_server.start()
    port = find_free_port()
    base = f"http://127.0.0.1:{port}"
    print(f"machine: {os.cpu_count()} CPU cores; redis on :{redis_server.port}; service on :{port}")
    system = {} if worker_niceness < 0 else {"worker_niceness": worker_niceness}
    os.environ.update(ingress_env(args.ingress, local=True))  # read by Ray's processes at start
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, _system_config=system)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        one = {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}}
        settings = {"state_dir": work, "job_store": f"redis://127.0.0.1:{redis_server.port}/0",
                    "max_inflight_sync": INFLIGHT, "max_running_jobs": 2, "max_queued_jobs": 200,
                    "job_heartbeat_s": 1.0, "standby": False}

        def deploy(hold_s: float) -> None:
            held = {"user_config": {"fault_injection": {"extra_latency_s": hold_s}}}
            serve.run(compose_app(settings, {"Ingress": one, "Denoiser": held}), name="bench", route_prefix="/")

        deploy(4.0)
        client = httpx.Client(base_url=base, timeout=600, trust_env=False)
        client.post("/v1/video/generate", json=SMALL, headers=AUTH).raise_for_status()  # warm-up

        # (1) 10x overload on the sync endpoint
        with ThreadPoolExecutor(INFLIGHT * 11) as pool:
            accepted = [pool.submit(client.post, "/v1/video/generate", json={**SMALL, "seed": i}, headers=AUTH)
                        for i in range(INFLIGHT)]
            time.sleep(1.0)  # both are inside their 4 s denoise hold

            # One pooled client with its connections opened beforehand: a client per request
            # would mostly measure this process creating clients (SSL contexts) under the GIL.
            shed = httpx.Client(base_url=base, timeout=60, trust_env=False,
                                limits=httpx.Limits(max_connections=INFLIGHT * 10))
            list(pool.map(lambda _: shed.get("/healthz"), range(INFLIGHT * 10)))

            def excess(i: int):
                t0 = time.perf_counter()
                r = shed.post("/v1/video/generate", json={**SMALL, "seed": i}, headers=AUTH)
                return r, time.perf_counter() - t0

            rejected = list(pool.map(excess, range(INFLIGHT * 10)))
            shed.close()
            done = [f.result() for f in accepted]
        lat = [t for r, t in rejected if r.status_code in (429, 503)]
        with_retry = sum(1 for r, _ in rejected if r.status_code in (429, 503) and r.headers.get("retry-after"))
        print(f"(1) overload: {len(rejected)} excess requests -> {len(lat)} refused "
              f"({with_retry} with Retry-After), {len(rejected) - len(lat)} other; refusal latency "
              f"p50 {statistics.median(lat) * 1000:.1f} ms, p99 {pct(lat, 0.99) * 1000:.1f} ms (goal < 100 ms); "
              f"accepted: {[r.status_code for r in done]}")
        if args.stop_after == "1":
            return

        # (2) event-loop stalls during a load run
        admin = {"Authorization": f"Bearer {ADMIN}"}
        ids: list[str] = []

        def load_run(label: str, seed0: int) -> None:
            client.get("/v1/admin/event-loop", headers=admin)  # start a fresh window
            mine = [client.post("/v1/video/jobs", json={**SMALL, "seed": seed0 + i}, headers=AUTH).json()["job_id"]
                    for i in range(args.jobs)]
            ids.extend(mine)
            polls, sync_codes = asyncio.run(load(base, mine, args.load_s))
            lag = client.get("/v1/admin/event-loop", headers=admin).json()
            print(f"(2{label}) load run: {args.jobs} jobs, {polls} polls, sync {sync_codes} over "
                  f"{lag['window_s']:.0f} s: longest event-loop stall {lag['max_lag_s'] * 1000:.1f} ms over "
                  f"{lag['samples']} samples (goal < 50 ms)")
            if lag.get("stall_stack"):
                print(f"    where the loop was, {lag['stall_stack_late_s'] * 1000:.0f} ms into the worst stall "
                      f"the watchdog caught:\n{lag['stall_stack']}")

        # Warm the job path first (first calls import and connect lazily): steady state is measured.
        warm = client.post("/v1/video/jobs", json=SMALL, headers=AUTH).json()["job_id"]
        while client.get(f"/v1/video/jobs/{warm}", headers=AUTH).json()["state"] not in ("succeeded", "failed"):
            time.sleep(0.2)
        load_run("a, generations held", 0)
        if args.stop_after in ("1", "2a"):
            return
        deploy(0.0)  # real generations from here on (a live reconfigure of the Denoiser)
        load_run("b, real generations", 1000)
        if args.stop_after == "2b":
            return

        # (3) Redis restarted mid-load
        def states() -> dict[str, int]:
            out: dict[str, int] = {}
            for job_id in ids:
                r = client.get(f"/v1/video/jobs/{job_id}", headers=AUTH)
                state = r.json()["state"] if r.status_code == 200 else str(r.status_code)
                out[state] = out.get(state, 0) + 1
            return out

        more = [client.post("/v1/video/jobs", json={**HEAVY, "seed": 100 + i}, headers=AUTH).json()["job_id"]
                for i in range(4)]
        finished_before = [j for j in ids if client.get(f"/v1/video/jobs/{j}", headers=AUTH).json()["state"]
                           == "succeeded"]
        ids += more
        redis_server.stop()
        t0 = time.perf_counter()
        during = [client.get(f"/v1/video/jobs/{ids[0]}", headers=AUTH),
                  client.post("/v1/video/jobs", json=SMALL, headers=AUTH)]
        answer_s = (time.perf_counter() - t0) / len(during)
        codes = [(r.status_code, r.headers.get("retry-after")) for r in during]
        redis_server.start()
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            now = states()
            if set(now) <= {"succeeded", "failed", "cancelled"}:
                break
            time.sleep(1)
        lost = [j for j in finished_before
                if client.get(f"/v1/video/jobs/{j}/content", headers=AUTH).status_code != 200]
        print(f"(3) redis restart: answers while down {codes} (~{answer_s * 1000:.0f} ms each); after the restart: "
              f"{now}; finished before the outage: {len(finished_before)}, lost: {len(lost)}")
    finally:
        serve.shutdown()
        ray.shutdown()
        redis_server.stop()


if __name__ == "__main__":
    main()
