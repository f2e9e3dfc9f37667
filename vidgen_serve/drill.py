"""Failover drills: deploy a Serve config, slow the primary denoiser down live, watch the switch.

Operators run the same thing against a staging cluster: `user_config.fault_injection` on
the `Denoiser` deployment is applied by Ray Serve's `reconfigure` without restarting the
replica. Configs are deployed through the public path an operator uses, `serve deploy`
against the Ray dashboard (with `RAY_AUTH_MODE=token`: local Ray clusters enable token
authentication and keep the token in `~/.ray/auth_token`).
Traffic goes only to the given base URL (localhost in tests and benchmarks), bounded in
count and time. Only the standard library is used for HTTP (no test extras).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


def serve_cli_env() -> dict[str, str]:
    """Environment for the `serve` CLI talking to a token-authenticated local cluster."""
    env = dict(os.environ)
    env.setdefault("RAY_AUTH_MODE", "token")  # the token itself: ~/.ray/auth_token (or RAY_AUTH_TOKEN[_PATH])
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return env


def _serve_cli(*args: str, timeout_s: float = 120.0) -> str:
    exe = shutil.which("serve", path=str(Path(sys.executable).parent)) or shutil.which("serve") or "serve"
    result = subprocess.run([exe, *args], env=serve_cli_env(), capture_output=True, text=True, timeout=timeout_s)
    if result.returncode != 0:
        raise RuntimeError(f"`serve {args[0]}` failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    return result.stdout


def deploy_config(config: dict[str, Any], dashboard: str, timeout_s: float = 180.0) -> None:
    """Deploy a Serve config dict with `serve deploy`, then wait until every application runs.

    Args:
        config: a Serve config (the shape of `serve_config.yaml`); validated first.
        dashboard: the Ray dashboard address, e.g. ``http://127.0.0.1:8265``.
        timeout_s: how long the applications may take to reach RUNNING.
    """
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(config)  # a bad config fails here, naming the field
    with tempfile.TemporaryDirectory(prefix="vidgen-drill-") as tmp:
        path = Path(tmp) / "serve_config.yaml"
        path.write_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False))
        _serve_cli("deploy", str(path), "--address", dashboard)
    names = [app["name"] for app in config["applications"]]
    deadline = time.monotonic() + timeout_s
    statuses: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = yaml.safe_load(_serve_cli("status", "--address", dashboard)) or {}
        statuses = {name: (status.get("applications") or {}).get(name, {}).get("status") for name in names}
        if all(s == "RUNNING" for s in statuses.values()):
            return
        if any(s == "DEPLOY_FAILED" for s in statuses.values()):
            raise RuntimeError(f"deploy failed: {statuses}")
        time.sleep(2)  # each poll starts the `serve` CLI: keep it light
    raise TimeoutError(f"applications not RUNNING after {timeout_s:g}s: {statuses}")


def with_faults(config: dict[str, Any], deployment: str, extra_latency_s: float = 0.0,
                error_rate: float = 0.0) -> dict[str, Any]:
    """A copy of `config` with `fault_injection` set on one deployment's user_config."""
    config = copy.deepcopy(config)
    for dep in config["applications"][0]["deployments"]:
        if dep["name"] == deployment:
            dep.setdefault("user_config", {})["fault_injection"] = {
                "extra_latency_s": extra_latency_s, "error_rate": error_rate}
            return config
    raise KeyError(f"deployment {deployment!r} not in the config")


def http(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None,
         timeout_s: float = 300.0) -> tuple[int, dict[str, str], bytes]:
    """One HTTP call with the standard library: (status, lower-cased headers, body); never raises on 4xx/5xx."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={
        **({"Content-Type": "application/json"} if data is not None else {}), **(headers or {})})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy
    try:
        with opener.open(req, timeout=timeout_s) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def wait_ready(base_url: str, timeout_s: float = 180.0) -> None:
    """Poll /readyz until the whole application is ready."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            status, _, body = http("GET", f"{base_url}/readyz", timeout_s=5)
            if status == 200:
                return
            last = body[:500]
        except OSError as exc:
            last = repr(exc)
        time.sleep(1)
    raise TimeoutError(f"{base_url} not ready after {timeout_s:g}s: {last!r}")


@dataclass
class Call:
    """One request of the drill."""

    phase: str
    status: int
    target: str | None
    seconds: float


@dataclass
class DrillReport:
    """What happened, for assertions (tests) and printing (benchmark)."""

    calls: list[Call] = field(default_factory=list)
    slow_calls_to_switch: int | None = None
    seconds_to_switch: float | None = None
    seconds_to_fail_back: float | None = None
    router_after_switch: dict[str, Any] = field(default_factory=dict)

    def phase(self, name: str) -> list[Call]:
        return [c for c in self.calls if c.phase == name]

    def p50(self, name: str) -> float | None:
        seconds = [c.seconds for c in self.phase(name)]
        return statistics.median(seconds) if seconds else None


def _call(base_url: str, headers: dict[str, str], body: dict, phase: str) -> Call:
    t0 = time.perf_counter()
    status, response_headers, _ = http("POST", f"{base_url}/v1/video/generate", body, headers)
    return Call(phase, status, response_headers.get("x-vidgen-denoiser"), time.perf_counter() - t0)


def failover_drill(
    config: dict[str, Any],
    dashboard: str,
    base_url: str,
    api_key: str,
    admin_key: str,
    request: dict[str, Any],
    steady_calls: int,
    extra_latency_s: float,
    max_slow_calls: int = 8,
    fail_back_timeout_s: float = 120.0,
) -> DrillReport:
    """Steady traffic, then a slow primary until traffic moves, then recovery until it returns.

    Args:
        config: the Serve config dict (faults off); deployed first.
        dashboard: the Ray dashboard address `serve deploy` talks to.
        base_url: the service's base URL (localhost).
        api_key, admin_key: keys for generation and for GET /v1/admin/router.
        request: the generation request body sent throughout.
        steady_calls: healthy calls first (>= the policy's learn_calls, so a baseline exists).
        extra_latency_s: latency added to every primary denoise call during the fault.
        max_slow_calls: give up waiting for the switch after this many calls.
        fail_back_timeout_s: give up waiting for the fail-back after this long.
    """
    report = DrillReport()
    deploy_config(config, dashboard)
    wait_ready(base_url)
    headers = {"Authorization": f"Bearer {api_key}"}
    for _ in range(steady_calls):
        report.calls.append(_call(base_url, headers, request, "steady"))

    deploy_config(with_faults(config, "Denoiser", extra_latency_s=extra_latency_s), dashboard)
    t_fault = time.monotonic()
    for i in range(max_slow_calls):
        call = _call(base_url, headers, request, "fault")
        report.calls.append(call)
        if call.target == "standby":
            report.slow_calls_to_switch = i  # primary calls before the first standby-served one
            report.seconds_to_switch = time.monotonic() - t_fault
            break
    _, _, body = http("GET", f"{base_url}/v1/admin/router", headers={"Authorization": f"Bearer {admin_key}"},
                      timeout_s=30)
    report.router_after_switch = json.loads(body)

    deploy_config(config, dashboard)  # the primary is healthy again
    t_heal = time.monotonic()
    while time.monotonic() - t_heal < fail_back_timeout_s:
        call = _call(base_url, headers, request, "recovery")
        report.calls.append(call)
        if call.target == "primary":
            report.seconds_to_fail_back = time.monotonic() - t_heal
            break
        time.sleep(0.5)
    return report
