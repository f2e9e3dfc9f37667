"""Bounded load runs against the local tiny service, with a report (`make loadtest`).

    python -m loadtests.run [--scenario mixed|autoscale|smoke] [--out DIR]
    python -m loadtests.run --url http://127.0.0.1:8000 --dashboard-url http://127.0.0.1:8265  # a running one

Without --url the runner starts the service itself, the way KubeRay does: a Ray head
(`ray start --head --block`, its own session, free ports, token auth) and the serve config
(serve_config.yaml + the scenario's overrides) deployed through the dashboard's REST API.
It waits for /readyz, runs Locust headless with the scenario's stages while sampling every
deployment's replica counts from Serve's status (the dashboard's /api/serve/applications/),
then stops the head and everything in its session. It writes Locust's CSVs, replicas.csv
and report.html + report.png, exits 1 when a request failed (a shed 429/503 is not a
failure; a 5xx is) or an expected scale-up/down did not happen, and prints the report's
path on its last line.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from loadtests.common import check_target
from loadtests.report import read_locust_csv, write_report
from vidgen_serve.deploy.k8s import merge_config
from vidgen_serve.front_door import INGRESS_KINDS, ingress_env
from vidgen_serve.net import find_free_port

ROOT = Path(__file__).resolve().parents[1]
LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
SCENARIOS = Path(__file__).resolve().parent / "scenarios.yaml"
STAGE_DEPLOYMENTS = ("TextEncoder", "Denoiser", "DenoiserStandby", "Decoder")


# ---- scenarios ------------------------------------------------------------------------------


@dataclass
class Scenario:
    name: str
    description: str
    serve_overrides: dict
    users: dict[str, int]
    mix: dict
    stages: list[dict]
    cooldown_s: float = 0.0
    expect_scaling: str | None = None
    ray_env: dict[str, str] = field(default_factory=dict)

    @property
    def load_s(self) -> float:
        return float(self.stages[-1]["until_s"])


def load_scenario(name: str, path: Path = SCENARIOS) -> Scenario:
    """A scenario of loadtests/scenarios.yaml (ValueError naming the known ones)."""
    scenarios = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("scenarios") or {}
    if name not in scenarios:
        raise ValueError(f"scenario {name!r} is unknown (scenarios in {path.name}: {sorted(scenarios)})")
    raw = scenarios[name]
    stages = raw.get("stages") or []
    if not stages or any(b["until_s"] <= a["until_s"] for a, b in zip(stages, stages[1:])):
        raise ValueError(f"scenario {name!r}: stages must be a non-empty list with increasing until_s")
    return Scenario(name=name, description=raw.get("description", ""), serve_overrides=raw.get("serve_overrides") or {},
                    users=raw.get("users") or {"SyncUser": 1}, mix=raw.get("mix") or {}, stages=stages,
                    cooldown_s=float(raw.get("cooldown_s", 0)), expect_scaling=raw.get("expect_scaling"),
                    ray_env={k: str(v) for k, v in (raw.get("ray_env") or {}).items()})


def scenario_serve_config(scenario: Scenario, serve_config: Path = ROOT / "serve_config.yaml") -> dict:
    """serve_config.yaml with the scenario's overrides (the k8s overlays' merge)."""
    return merge_config(yaml.safe_load(serve_config.read_text(encoding="utf-8")), scenario.serve_overrides)


# ---- the local service ------------------------------------------------------------------------


def ray_auth_token() -> str | None:
    """Ray's token, where Ray itself looks: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    return path.read_text().strip() if path.is_file() else None


def _session_pids(sid: int) -> list[int]:
    """Processes of one session (the head's `ray start` and everything it started)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid:
            pids.append(int(stat.parent.name))
    return pids


class LocalService:
    """The serve config running on a private local Ray head; a context manager that always cleans up."""

    def __init__(self, config: dict, workdir: Path, num_cpus: int = 4, start_timeout_s: float = 600,
                 env: dict[str, str] | None = None, ingress: str = "haproxy"):
        self.config = copy_config(config)
        self.ingress = ingress
        self.extra_env = dict(env or {})
        self.workdir = workdir
        self.num_cpus = num_cpus
        self.start_timeout_s = start_timeout_s
        self.api_key = secrets.token_urlsafe(24)
        # Ray's token where one is configured; else an ephemeral one for this private cluster
        # (`ray start` with token auth and no token refuses to start; nothing is written to $HOME).
        self.ray_token = ray_auth_token() or secrets.token_hex(32)
        self.proc: subprocess.Popen | None = None
        self.port = find_free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dashboard_url = ""
        self._temp = ""

    def __enter__(self) -> "LocalService":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def dashboard_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.ray_token}"}

    def start(self) -> None:
        self.config.setdefault("http_options", {}).update(host="127.0.0.1", port=self.port)
        args = self.config["applications"][0].setdefault("args", {})
        args["state_dir"] = str(self.workdir / "state")
        dashboard = find_free_port()
        self.dashboard_url = f"http://127.0.0.1:{dashboard}"
        # Short: Ray's socket paths live under it and must stay under 108 bytes.
        self._temp = tempfile.mkdtemp(prefix="vlt-", dir="/tmp")
        env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.ray_token, RAY_USAGE_STATS_ENABLED="0",
                   VIDGEN_API_KEYS=self.api_key,
                   PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        env.pop("RAY_ADDRESS", None)
        env.setdefault("RAY_worker_niceness", "0")  # as `vidgen-serve serve` and k8s/base/env.yaml
        env.update(ingress_env(self.ingress, local=True))  # the front door, as `vidgen-serve serve --ingress`
        env.update(self.extra_env)
        ray_bin = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
        cmd = [ray_bin, "start", "--head", "--block", "--disable-usage-stats", "--node-ip-address", "127.0.0.1",
               "--port", str(find_free_port()), "--num-cpus", str(self.num_cpus), "--include-dashboard", "true",
               "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
               "--ray-client-server-port", str(find_free_port()), "--dashboard-agent-listen-port", str(find_free_port()),
               "--metrics-export-port", str(find_free_port()), "--temp-dir", self._temp]
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.workdir / "ray-head.log", "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                     cwd=ROOT)
        log.close()
        deadline = time.monotonic() + self.start_timeout_s
        self._wait(lambda c: c.get(f"{self.dashboard_url}/api/serve/applications/",
                                   headers=self.dashboard_headers()).status_code == 200, deadline, "the Ray dashboard")
        self.deploy(self.config, wait=False)
        self._wait(lambda c: c.get(f"{self.url}/readyz").status_code == 200, deadline, f"{self.url}/readyz")

    def deploy(self, config: dict, wait: bool = True, timeout_s: float = 300) -> None:
        """Apply a serve config through the dashboard, as `serve deploy` and KubeRay do.

        Returns once Serve runs it: every deployment's user_config is the new one (applied live
        by `reconfigure`) and every deployment is HEALTHY again.
        """
        with httpx.Client(timeout=60, trust_env=False) as client:
            r = client.put(f"{self.dashboard_url}/api/serve/applications/", json=config,
                           headers=self.dashboard_headers())
            if r.status_code != 200:
                raise RuntimeError(f"deploying the serve config failed: {r.status_code} {r.text[:500]}")
            self.config = copy_config(config)
            wanted = {d["name"]: d["user_config"] for app in config["applications"]
                      for d in app.get("deployments", []) if "user_config" in d}

            def applied(c: httpx.Client) -> bool:
                details = c.get(f"{self.dashboard_url}/api/serve/applications/", headers=self.dashboard_headers())
                deployments = {name: dep for app in details.json()["applications"].values()
                               for name, dep in app["deployments"].items()}
                return all(deployments[name]["deployment_config"].get("user_config") == user_config
                           for name, user_config in wanted.items()) and \
                    all(dep["status"] == "HEALTHY" for dep in deployments.values())

            if wait and wanted:
                self._wait(applied, time.monotonic() + timeout_s, "the new serve config")

    def _wait(self, ready, deadline: float, what: str) -> None:
        with httpx.Client(timeout=10, trust_env=False) as client:
            while True:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"the Ray head exited ({self.proc.returncode}) while waiting for {what}; "
                                       f"see {self.workdir / 'ray-head.log'}")
                try:
                    if ready(client):
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{what} not ready after {self.start_timeout_s:.0f}s; "
                                       f"see {self.workdir / 'ray-head.log'}")
                time.sleep(1)

    def stop(self) -> None:
        """SIGTERM to the head's session (Ray drains and stops its processes), then SIGKILL to what is left."""
        if self.proc is not None:
            sid = self.proc.pid  # start_new_session: the session id is the head's pid
            try:
                os.killpg(sid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
            deadline = time.monotonic() + 10
            while _session_pids(sid) and time.monotonic() < deadline:
                time.sleep(0.5)
            for pid in _session_pids(sid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(timeout=10)
            self.proc = None
        if self._temp:
            shutil.rmtree(self._temp, ignore_errors=True)
            self._temp = ""


def copy_config(config: dict) -> dict:
    return json.loads(json.dumps(config))


# ---- sampling Serve's status ------------------------------------------------------------------


class ReplicaSampler(threading.Thread):
    """Replica counts per deployment, sampled from Serve's status through the dashboard."""

    def __init__(self, dashboard_url: str, headers: dict[str, str], interval_s: float = 1.0):
        super().__init__(daemon=True, name="replica-sampler")
        self.dashboard_url = dashboard_url
        self.headers = headers
        self.interval_s = interval_s
        self.rows: list[dict[str, Any]] = []
        self.errors = 0
        self._halt = threading.Event()

    def sample(self, client: httpx.Client) -> list[dict[str, Any]]:
        r = client.get(f"{self.dashboard_url}/api/serve/applications/", headers=self.headers)
        r.raise_for_status()
        now, rows = time.time(), []
        for app in (r.json().get("applications") or {}).values():
            for name, dep in (app.get("deployments") or {}).items():
                replicas = dep.get("replicas") or []
                rows.append({"timestamp": now, "deployment": name, "status": dep.get("status"),
                             "running": sum(1 for rep in replicas if rep.get("state") == "RUNNING"),
                             "replicas": len(replicas), "target": dep.get("target_num_replicas")})
        return rows

    def run(self) -> None:
        with httpx.Client(timeout=5, trust_env=False) as client:
            while not self._halt.is_set():
                try:
                    self.rows += self.sample(client)
                except (httpx.HTTPError, ValueError):
                    self.errors += 1
                self._halt.wait(self.interval_s)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)

    def latest(self, deployment: str) -> dict[str, Any] | None:
        return next((row for row in reversed(self.rows) if row["deployment"] == deployment), None)

    def write_csv(self, path: Path) -> None:
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["timestamp", "deployment", "status", "running", "replicas",
                                                   "target"])
            writer.writeheader()
            writer.writerows(self.rows)


# ---- one run ----------------------------------------------------------------------------------------


@dataclass
class LoadRun:
    scenario: Scenario
    out: Path
    started: float
    ended: float
    locust_returncode: int
    min_replicas: dict[str, int] = field(default_factory=dict)

    @property
    def csv_prefix(self) -> Path:
        return self.out / "locust"


def run_load(url: str, scenario: Scenario, out: Path, api_key: str, sampler: ReplicaSampler | None = None,
             min_replicas: dict[str, int] | None = None, allow_remote: bool = False) -> LoadRun:
    """Locust headless with the scenario's stages against `url`; the sampler (if any) runs throughout."""
    check_target(url, allow_remote)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, VIDGEN_API_KEY=api_key, VIDGEN_LOADTEST_MIX=json.dumps(scenario.mix),
               VIDGEN_LOADTEST_USERS=json.dumps(scenario.users), VIDGEN_LOADTEST_STAGES=json.dumps(scenario.stages),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    if allow_remote:
        env["VIDGEN_LOADTEST_ALLOW_REMOTE"] = "1"
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--host", url, "--headless",
           "--csv", str(out / "locust"), "--csv-full-history", "--only-summary", "--loglevel", "WARNING",
           # A hard stop beyond the last stage, in case the shape never ends.
           "--run-time", f"{int(scenario.load_s) + 30}s", "--stop-timeout", "5"]
    if sampler is not None and not sampler.is_alive():
        sampler.start()
    started = time.time()
    with (out / "locust.log").open("w") as log:
        try:
            returncode = subprocess.run(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                        timeout=scenario.load_s + 120).returncode
        except subprocess.TimeoutExpired:
            returncode = -1
    ended = time.time()
    if sampler is not None:
        _cooldown(sampler, scenario, min_replicas or {})
    return LoadRun(scenario, out, started, ended, returncode, dict(min_replicas or {}))


def _cooldown(sampler: ReplicaSampler, scenario: Scenario, min_replicas: dict[str, int]) -> None:
    # Keep sampling after the load: the scale-down is part of the picture. A scenario that
    # expects scaling stops waiting as soon as its deployment is back at its minimum.
    deadline = time.monotonic() + scenario.cooldown_s
    while time.monotonic() < deadline:
        if scenario.expect_scaling:
            last = sampler.latest(scenario.expect_scaling)
            floor = min_replicas.get(scenario.expect_scaling, 1)
            peak = max((r["running"] for r in sampler.rows if r["deployment"] == scenario.expect_scaling), default=0)
            if last and peak > floor and last["running"] <= floor and (last["target"] or 0) <= floor:
                time.sleep(2)  # a couple more samples at the floor
                break
        time.sleep(1)


def min_replicas_of(config: dict) -> dict[str, int]:
    """Each deployment's minimum replicas in a serve config (num_replicas for fixed ones)."""
    out = {}
    for dep in config["applications"][0].get("deployments", []):
        auto = dep.get("autoscaling_config") or {}
        out[dep["name"]] = int(auto.get("min_replicas", dep.get("num_replicas", 1)))
    return out


# ---- the verdict --------------------------------------------------------------------------------------


def verdict(run: LoadRun, sampler_rows: list[dict[str, Any]]) -> tuple[bool, list[str]]:
    """(passed, reasons): failed requests, a Locust that did not finish, or missing scaling fail a run."""
    reasons = []
    stats = read_locust_csv(run.csv_prefix, "stats")
    total = next((row for row in stats if row["Name"] == "Aggregated"), None)
    if total is None:
        reasons.append(f"Locust wrote no statistics (exit code {run.locust_returncode}; see {run.out / 'locust.log'})")
    else:
        failures = int(total["Failure Count"])
        if failures:
            failed = [f"{row['Name']}: {row['Failure Count']}" for row in stats
                      if row["Name"] != "Aggregated" and int(row["Failure Count"])]
            reasons.append(f"{failures} request(s) failed ({', '.join(failed)}; see locust_failures.csv)")
        if int(total["Request Count"]) == 0:
            reasons.append("no request was sent")
    if run.locust_returncode not in (0, 1):  # 1 = "there were failures", reported above
        reasons.append(f"Locust exited with {run.locust_returncode} (see {run.out / 'locust.log'})")
    if run.scenario.expect_scaling:
        name = run.scenario.expect_scaling
        floor = run.min_replicas.get(name, 1)
        counts = [r["running"] for r in sampler_rows if r["deployment"] == name]
        if not counts or max(counts) <= floor:
            reasons.append(f"{name} never scaled above its minimum of {floor} replica(s) (samples: {len(counts)})")
        elif counts[-1] > floor:
            reasons.append(f"{name} did not scale back down to {floor} replica(s) after the load "
                           f"(last sample: {counts[-1]})")
    return not reasons, reasons


def measure(url: str, scenario: Scenario, out: Path, api_key: str, sampler: ReplicaSampler | None,
            minimums: dict[str, int], allow_remote: bool = False) -> tuple[LoadRun, list[dict[str, Any]]]:
    """`run_load` with the replica sampler started before and stopped after (replicas.csv written)."""
    try:
        run = run_load(url, scenario, out, api_key, sampler, minimums, allow_remote)
    finally:
        if sampler is not None:
            sampler.stop()
    if sampler is None:
        return run, []
    sampler.write_csv(out / "replicas.csv")
    return run, sampler.rows


def conclude(run: LoadRun, rows: list[dict[str, Any]]) -> tuple[bool, list[str], Path]:
    """The verdict and the report of a run: (passed, reasons, report.html)."""
    passed, reasons = verdict(run, rows)
    return passed, reasons, write_report(run, rows, passed, reasons)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", default="mixed", help="a scenario of loadtests/scenarios.yaml")
    parser.add_argument("--scenarios", default=str(SCENARIOS), help="the scenarios file")
    parser.add_argument("--config", default=str(ROOT / "serve_config.yaml"), help="the serve config to start")
    parser.add_argument("--out", help="output directory (default: var/loadtest/<scenario>-<time>)")
    parser.add_argument("--url", help="load a service that is already running instead of starting one")
    parser.add_argument("--dashboard-url", help="with --url: the Ray dashboard to sample replica counts from")
    parser.add_argument("--api-key", default=os.environ.get("VIDGEN_API_KEY"), help="with --url: the bearer key")
    parser.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --url (a cluster you own)")
    parser.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray head")
    parser.add_argument("--ingress", choices=INGRESS_KINDS, default="haproxy",
                        help="front door of the local service (as `vidgen-serve serve --ingress`)")
    args = parser.parse_args(argv)

    try:
        scenario = load_scenario(args.scenario, Path(args.scenarios))
        if args.url:
            check_target(args.url, args.allow_remote)
            if not args.api_key:
                raise ValueError("--url needs --api-key (or VIDGEN_API_KEY)")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out or ROOT / "var" / "loadtest" / f"{scenario.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    config = scenario_serve_config(scenario, Path(args.config))
    minimums = min_replicas_of(config)
    if args.url:
        sampler = ReplicaSampler(args.dashboard_url, {"Authorization": f"Bearer {ray_auth_token()}"}) \
            if args.dashboard_url else None
        run, rows = measure(args.url, scenario, out, args.api_key, sampler, minimums, args.allow_remote)
    else:
        print(f"starting the local service ({scenario.name}: {scenario.description}) ...", file=sys.stderr, flush=True)
        try:
            with LocalService(config, out, env=scenario.ray_env, ingress=args.ingress) as service:
                print(f"ready at {service.url}; load for {scenario.load_s:.0f}s", file=sys.stderr, flush=True)
                run, rows = measure(service.url, scenario, out, service.api_key,
                                    ReplicaSampler(service.dashboard_url, service.dashboard_headers()), minimums)
        except (RuntimeError, TimeoutError) as exc:
            print(f"error: the local service did not start: {exc}", file=sys.stderr)
            return 1
    passed, reasons, report = conclude(run, rows)
    for reason in reasons:
        print(f"FAILED: {reason}", file=sys.stderr)
    print(f"{'passed' if passed else 'FAILED'}: {scenario.name}; CSVs in {out}")
    print(f"report: {report}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
