"""Load shedding: how fast an over-capacity sync request gets its 429, next to accepted ones.

Starts the application on a local Ray cluster (tiny profile, 127.0.0.1 only) once per front door
(`--ingress`: Ray Serve's HAProxy ingress, as shipped, and Serve's Python proxy), then sends
`--rounds` bursts of `--factor` x `max_inflight_sync` concurrent `POST /v1/video/generate`
(12 x 4 = 48 by default). Per round, the requests over capacity must get 429 + Retry-After
at once while the accepted ones generate. Printed, side by side from the same run:

- 429 latency p50 / p99 / max (all rounds together), and how many requests got what;
- accepted-request latency p50 in the bursts, and of lone requests (the baseline a 429
  must be far below: a rejection must not wait behind generation work);
- the floor: `GET /healthz` sent with each burst (no work at all, same proxy and replica),
  i.e. what any answer costs on this machine while the accepted requests generate.

Bounded: `--rounds` bursts (default 3) and a wall-clock cap (`--max-seconds`).

    .venv/bin/python benchmarks/shedding.py [--rounds 3] [--factor 12] [--max-inflight 4] [--ingress haproxy proxy]
        [--variants 0:10 ray:10]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import statistics
import tempfile
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("VIDGEN_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"vidgen-test-cache-{os.getuid()}"))

from vidgen_serve.front_door import INGRESS_KINDS, ingress_env  # noqa: E402 - after the environment is set
from vidgen_serve.net import find_free_port  # noqa: E402

REQUEST = {"prompt": "a paper boat on a rainy street", "duration": 1, "resolution": "480p",
           "num_inference_steps": 4}
KEY = "bench-key"


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:7.1f} ms"


async def burst(client, base_url: str, n: int, seed0: int, floor: int):
    """`n` concurrent generate calls (and `floor` GET /healthz) released together.

    Returns:
        ([(status, seconds, Retry-After)] of the generate calls, [seconds] of the health calls).
    """
    start = asyncio.Event()

    async def generate(i: int):
        await start.wait()
        t0 = time.perf_counter()
        status, headers = await client.post(f"{base_url}/v1/video/generate", {**REQUEST, "seed": seed0 + i})
        return status, time.perf_counter() - t0, headers.get("retry-after")

    async def health():
        await start.wait()
        t0 = time.perf_counter()
        await client.get_ok(f"{base_url}/healthz")
        return time.perf_counter() - t0

    tasks = [asyncio.create_task(generate(i)) for i in range(n)]
    floors = [asyncio.create_task(health()) for _ in range(floor)]
    await asyncio.sleep(0.2)  # every task is parked on the event before any request starts
    start.set()
    return await asyncio.gather(*tasks), await asyncio.gather(*floors)


async def idle_burst(client, base_url: str, n: int) -> list[float]:
    """`n` concurrent GET /healthz with nothing else running: what the proxy + ingress cost alone."""
    start = asyncio.Event()

    async def health():
        await start.wait()
        t0 = time.perf_counter()
        await client.get_ok(f"{base_url}/healthz")
        return time.perf_counter() - t0

    tasks = [asyncio.create_task(health()) for _ in range(n)]
    await asyncio.sleep(0.2)
    start.set()
    return await asyncio.gather(*tasks)


class Client:
    """The burst's HTTP client: aiohttp (default) or httpx, behind the three calls used here.

    The client shares the two cores with the service, so its own cost per request is part of
    every latency measured: 52 concurrent GETs to a bare FastAPI app on uvicorn take p99 ~10 ms
    with aiohttp and ~70-180 ms with httpx on this machine (`client floor` in the report)."""

    def __init__(self, kind: str, connections: int):
        self.kind, self.connections = kind, connections

    async def __aenter__(self) -> "Client":
        headers = {"Authorization": f"Bearer {KEY}"}
        if self.kind == "aiohttp":
            import aiohttp

            self._session = aiohttp.ClientSession(
                headers=headers, timeout=aiohttp.ClientTimeout(total=300),
                connector=aiohttp.TCPConnector(limit=self.connections, force_close=False))
        else:
            import httpx

            limits = httpx.Limits(max_connections=self.connections, max_keepalive_connections=self.connections)
            self._session = httpx.AsyncClient(headers=headers, timeout=300, limits=limits, trust_env=False)
        await self._session.__aenter__()
        return self

    async def __aexit__(self, *exc) -> None:
        await self._session.__aexit__(*exc)

    async def post(self, url: str, body: dict) -> tuple[int, dict]:
        """(status, headers) of a POST; the body is read to the end."""
        if self.kind == "aiohttp":
            async with self._session.post(url, json=body) as r:
                await r.read()
                return r.status, {k.lower(): v for k, v in r.headers.items()}
        r = await self._session.post(url, json=body)
        return r.status_code, {k.lower(): v for k, v in r.headers.items()}

    async def get_ok(self, url: str) -> None:
        if self.kind == "aiohttp":
            async with self._session.get(url) as r:
                await r.read()
                r.raise_for_status()
        else:
            (await self._session.get(url)).raise_for_status()

    async def post_ok(self, url: str, body: dict) -> None:
        status, _ = await self.post(url, body)
        if status != 200:
            raise RuntimeError(f"POST {url}: {status}")


async def client_floor(kind: str, n: int, rounds: int) -> list[float]:
    """`n` concurrent GETs against a bare FastAPI app on uvicorn (nothing of the service): what
    the client and HTTP on this machine cost by themselves, with the same burst."""
    import subprocess
    import sys

    port = find_free_port()
    app = ("from fastapi import FastAPI\napp = FastAPI()\n@app.get('/healthz')\n"
           "async def healthz():\n    return {'status': 'ok'}\n")
    workdir = tempfile.mkdtemp(prefix="vidgen-floor-")
    with open(os.path.join(workdir, "bare_app.py"), "w") as f:
        f.write(app)
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "bare_app:app", "--host", "127.0.0.1", "--port",
                             str(port), "--log-level", "warning"], cwd=workdir)
    try:
        async with Client(kind, n + 8) as client:
            for _ in range(100):
                try:
                    await client.get_ok(f"http://127.0.0.1:{port}/healthz")
                    break
                except Exception:  # noqa: BLE001 - not listening yet
                    await asyncio.sleep(0.1)
            out = []
            for _ in range(rounds):
                out += await idle_burst(client, f"http://127.0.0.1:{port}", n)
            return out
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def run(base_url: str, args) -> dict[str, list]:
    """One variant's measurements: {"rejected", "accepted", "other", "floor", "lone", "idle"}."""
    url = f"{base_url}/v1/video/generate"
    n = args.factor * args.max_inflight
    deadline = time.monotonic() + args.max_seconds
    async with Client(args.client, n + 8) as client:
        await client.post_ok(url, {**REQUEST, "seed": 1})
        idle = []
        for _ in range(args.rounds):
            idle += await idle_burst(client, base_url, n + args.floor)
        lone = []
        for i in range(args.lone):
            t0 = time.perf_counter()
            await client.post_ok(url, {**REQUEST, "seed": 10 + i})
            lone.append(time.perf_counter() - t0)
        rejected, accepted, other, floor = [], [], [], []
        for round_no in range(args.rounds):
            if time.monotonic() > deadline:
                print(f"stopping after {round_no} rounds: --max-seconds {args.max_seconds:g} reached")
                break
            results, health = await burst(client, base_url, n, 1000 * (round_no + 1), args.floor)
            floor += health
            for status, seconds, retry_after in results:
                if status == 429:
                    assert retry_after is not None and int(retry_after) >= 1, "429 without Retry-After"
                    rejected.append(seconds)
                elif status == 200:
                    accepted.append(seconds)
                else:
                    other.append(status)
            print(f"round {round_no + 1}: {n} concurrent -> "
                  f"{sum(s == 200 for s, _, _ in results)} x 200, {sum(s == 429 for s, _, _ in results)} x 429, "
                  f"other {[s for s, _, _ in results if s not in (200, 429)]}")
    return {"rejected": rejected, "accepted": accepted, "other": other, "floor": floor, "lone": lone, "idle": idle}


def report(label: str, r: dict[str, list]) -> None:
    rejected, accepted, other, floor, lone, idle = (r[k] for k in ("rejected", "accepted", "other", "floor",
                                                                   "lone", "idle"))
    print(f"--- {label}")
    print(f"requests: {len(accepted)} accepted, {len(rejected)} rejected (429), {len(other)} other {other}")
    if rejected:
        print(f"429 latency       p50 {ms(statistics.median(rejected))}   p99 {ms(percentile(rejected, 99))}   "
              f"max {ms(max(rejected))}   (goal: p99 < 100 ms on this machine)")
    if floor:
        print(f"GET /healthz      p50 {ms(statistics.median(floor))}   p99 {ms(percentile(floor, 99))}   "
              "(floor: no work at all, same bursts)")
    if r.get("client"):
        c = r["client"]
        print(f"client floor      p50 {ms(statistics.median(c))}   p99 {ms(percentile(c, 99))}   "
              "(as many at once to a bare FastAPI app on uvicorn: the client and HTTP alone)")
    if idle:
        print(f"GET /healthz idle p50 {ms(statistics.median(idle))}   p99 {ms(percentile(idle, 99))}   "
              "(as many at once, no generation running: proxy + ingress alone)")
    if accepted:
        print(f"accepted (burst)  p50 {ms(statistics.median(accepted))}   p99 {ms(percentile(accepted, 99))}")
    if lone:
        print(f"accepted (alone)  p50 {ms(statistics.median(lone))}")
    if rejected and lone:
        print(f"ratio 429 p99 / lone accepted p50: {percentile(rejected, 99) / statistics.median(lone):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="bursts to send (default 3)")
    parser.add_argument("--factor", type=int, default=12, help="burst size as a multiple of max_inflight_sync")
    parser.add_argument("--max-inflight", type=int, default=4, help="max_inflight_sync of the service")
    parser.add_argument("--lone", type=int, default=3, help="lone accepted requests for the baseline")
    parser.add_argument("--floor", type=int, default=4, help="GET /healthz sent with each burst")
    parser.add_argument("--max-seconds", type=float, default=300, help="stop starting rounds after this long")
    parser.add_argument("--ingress", nargs="+", choices=INGRESS_KINDS, default=list(INGRESS_KINDS),
                        help="front doors measured one after the other in this run, each on a fresh local cluster "
                        "(default: both, HAProxy first)")
    parser.add_argument("--variants", nargs="+", default=["0:10"],
                        help="WORKER_NICENESS:STAGE_NICE pairs measured one after the other in this run, each on a "
                        "fresh local cluster: WORKER_NICENESS is Ray's worker_niceness ('ray' = Ray's default, 15), "
                        "STAGE_NICE the service's stage_nice (default 0:10, as `vidgen-serve serve` runs). "
                        "E.g. ray:0 0:0 0:10")
    parser.add_argument("--client", choices=("aiohttp", "httpx"), default="aiohttp",
                        help="HTTP client of the bursts (its own cost is measured too: 'client floor')")
    args = parser.parse_args()
    if not 1 <= args.rounds <= 20 or not 1 <= args.factor * args.max_inflight <= 256:
        parser.error("keep it bounded: 1..20 rounds, at most 256 concurrent requests")

    variants = []
    for text in args.variants:
        worker, _, stage = text.partition(":")
        try:
            variants.append((None if worker == "ray" else int(worker), int(stage or 0)))
        except ValueError:
            parser.error(f"--variants: {text!r} is not WORKER_NICENESS:STAGE_NICE")

    os.environ["VIDGEN_API_KEYS"] = KEY  # replicas inherit the environment of the process that starts Ray
    import ray
    from ray import serve

    from vidgen_serve.serve import build_app

    print(f"machine: {os.cpu_count()} CPU cores; request: {REQUEST}; "
          f"{args.factor} x max_inflight_sync {args.max_inflight} = {args.factor * args.max_inflight} concurrent; "
          f"this process's niceness {os.nice(0)}")
    results = {}
    for front_door, (worker_nice, stage_nice) in itertools.product(args.ingress, variants):
        label = (f"ingress={front_door}, worker_niceness={'ray default' if worker_nice is None else worker_nice}, "
                 f"stage_nice={stage_nice}")
        print(f"=== {label}")
        port = find_free_port()
        system = {} if worker_nice is None else {"worker_niceness": worker_nice}
        os.environ.update(ingress_env(front_door, local=True))  # Ray's processes read it when they start
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, _system_config=system)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(build_app({"state_dir": tempfile.mkdtemp(prefix="vidgen-bench-"),
                                 "max_inflight_sync": args.max_inflight, "request_timeout_s": 300,
                                 "stage_nice": stage_nice}),
                      name="bench", route_prefix="/")
            print(f"niceness of the serving processes: {niceness_of_serve_processes()}")
            results[label] = asyncio.run(run(f"http://127.0.0.1:{port}", args))
            n = args.factor * args.max_inflight + args.floor
            results[label]["client"] = asyncio.run(client_floor(args.client, n, args.rounds))
        finally:
            serve.shutdown()
            ray.shutdown()
    print()
    for label, r in results.items():
        report(label, r)


def niceness_of_serve_processes() -> dict[str, str]:
    """{process: niceness of its busiest threads} of the proxy and the replicas (Linux /proc)."""
    out: dict[str, str] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            if "ProxyActor" not in cmd and "ServeReplica:bench" not in cmd:
                continue
            name = "ProxyActor" if "ProxyActor" in cmd else cmd.split("ServeReplica:bench:")[1].split()[0].split(".")[0]
            nices = sorted({os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir(f"/proc/{pid}/task")})
        except (OSError, IndexError):
            continue
        out[name] = "/".join(map(str, nices))
    return dict(sorted(out.items()))


if __name__ == "__main__":
    main()
