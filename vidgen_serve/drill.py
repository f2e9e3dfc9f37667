"""Failover drills: deploy a Serve config, slow the primary denoiser down live, watch the switch.

Operators run the same thing against a staging cluster: `user_config.fault_injection` on
the `Denoiser` deployment is applied by Ray Serve's `reconfigure` without restarting the
replica, exactly as a `serve deploy` of an edited `serve_config.yaml` would.
Traffic goes only to the given base URL (localhost in tests and benchmarks), bounded in
count and time.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import httpx


def deploy_config(config: dict[str, Any]) -> None:
    """Deploy a Serve config dict the way `serve run/deploy serve_config.yaml` does (Ray must be up)."""
    from ray.serve._private import api as serve_api
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    client = serve_api.serve_start(http_options=schema.http_options.model_dump(),
                                   proxy_location=schema.proxy_location)
    client.deploy_apps(schema, _blocking=True)


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


def wait_ready(base_url: str, timeout_s: float = 180.0) -> None:
    """Poll /readyz until the whole application is healthy."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{base_url}/readyz", timeout=5)
            if r.status_code == 200:
                return
            last = r.text
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(1)
    raise TimeoutError(f"{base_url} not ready after {timeout_s:g}s: {last}")


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


def _call(client: httpx.Client, base_url: str, body: dict, phase: str) -> Call:
    t0 = time.perf_counter()
    r = client.post(f"{base_url}/v1/video/generate", json=body)
    return Call(phase, r.status_code, r.headers.get("x-vidgen-denoiser"), time.perf_counter() - t0)


def failover_drill(
    config: dict[str, Any],
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
        base_url: the service's base URL (localhost).
        api_key, admin_key: keys for generation and for GET /v1/admin/router.
        request: the generation request body sent throughout.
        steady_calls: healthy calls first (>= the policy's learn_calls, so a baseline exists).
        extra_latency_s: latency added to every primary denoise call during the fault.
        max_slow_calls: give up waiting for the switch after this many calls.
        fail_back_timeout_s: give up waiting for the fail-back after this long.
    """
    report = DrillReport()
    deploy_config(config)
    wait_ready(base_url)
    headers = {"Authorization": f"Bearer {api_key}"}
    with httpx.Client(headers=headers, timeout=300) as client:
        for _ in range(steady_calls):
            report.calls.append(_call(client, base_url, request, "steady"))

        deploy_config(with_faults(config, "Denoiser", extra_latency_s=extra_latency_s))
        t_fault = time.monotonic()
        for i in range(max_slow_calls):
            call = _call(client, base_url, request, "fault")
            report.calls.append(call)
            if call.target == "standby":
                report.slow_calls_to_switch = i  # primary calls before the first standby-served one
                report.seconds_to_switch = time.monotonic() - t_fault
                break
        report.router_after_switch = httpx.get(
            f"{base_url}/v1/admin/router", headers={"Authorization": f"Bearer {admin_key}"}, timeout=30).json()

        deploy_config(config)  # the primary is healthy again
        t_heal = time.monotonic()
        while time.monotonic() - t_heal < fail_back_timeout_s:
            call = _call(client, base_url, request, "recovery")
            report.calls.append(call)
            if call.target == "primary":
                report.seconds_to_fail_back = time.monotonic() - t_heal
                break
            time.sleep(0.5)
    return report
