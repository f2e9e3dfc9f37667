"""Load tests: the request mix, what counts as shed vs failed, loopback-only targets, and one
short bounded run through the same code as `make loadtest` (start, load, report, stop)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loadtests.common import DEFAULT_MIX, INVALID_REQUESTS, check_target, is_loopback, is_shed, make_request
from loadtests.run import load_scenario, main, scenario_serve_config

ROOT = Path(__file__).resolve().parents[1]
SCENARIO_NAMES = ("mixed", "autoscale", "smoke")


@pytest.mark.parametrize(("url", "loopback"), [
    ("http://127.0.0.1:8000", True), ("http://127.9.9.9:1", True), ("http://localhost:8000", True),
    ("http://[::1]:8000", True), ("http://10.0.0.5:8000", False), ("http://192.168.1.2", False),
    ("http://example.com", False), ("http://127.0.0.1.example.com", False), ("", False),
])
def test_only_loopback_hosts_are_targets(url, loopback, monkeypatch):
    monkeypatch.delenv("VIDGEN_LOADTEST_ALLOW_REMOTE", raising=False)
    assert is_loopback(url) is loopback
    if loopback:
        check_target(url)
    else:
        with pytest.raises(ValueError, match="loopback hosts only"):
            check_target(url)
        check_target(url, allow_remote=True)  # explicitly allowed


def test_runner_refuses_a_remote_url_before_sending_anything(capsys, tmp_path):
    assert main(["--url", "http://10.1.2.3:8000", "--api-key", "k", "--out", str(tmp_path / "out")]) == 2
    assert "loopback hosts only" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_locustfile_refuses_a_remote_host():
    env = dict(os.environ, VIDGEN_API_KEY="k", PYTHONPATH=str(ROOT))
    env.pop("VIDGEN_LOADTEST_ALLOW_REMOTE", None)
    result = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtests" / "locustfile.py"), "--host",
         "http://10.9.8.7:8000", "--headless", "-u", "1", "-t", "2s"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "refusing to load-test" in result.stderr, result.stderr[-2000:]


@pytest.mark.parametrize(("status", "headers", "body", "shed"), [
    (429, {"Retry-After": "5"}, {"error": {"code": "overloaded"}}, True),
    (503, {"retry-after": "10"}, {"error": {"code": "stage_unavailable"}}, True),
    (503, {}, {"error": {"code": "overloaded"}}, True),
    (503, {}, {"error": {"code": "injected_fault"}}, False),
    (503, {"Retry-After": "5"}, {"error": {"code": "injected_fault"}}, False),  # every 503 has Retry-After
    (500, {}, {"error": {"code": "internal"}}, False),
    (504, {"Retry-After": "1"}, None, False),
    (200, {}, None, False),
])
def test_shed_answers_are_429_or_503_with_retry_advice(status, headers, body, shed):
    assert is_shed(status, headers, body) is shed


@pytest.mark.parametrize("name", SCENARIO_NAMES)
def test_scenario_mixes_draw_valid_requests_and_invalid_ones_are_refused(name):
    from vidgen_serve.config import AppConfig
    from vidgen_serve.errors import VidgenError
    from vidgen_serve.plan import build_plan
    from vidgen_serve.request import parse_request

    scenario = load_scenario(name)
    mix = {**DEFAULT_MIX, **scenario.mix}
    config = AppConfig()
    rng = random.Random(0)
    seen = set()
    for _ in range(60):
        body = make_request(mix, rng)
        build_plan(parse_request(body), config)  # raises on anything the tiny profile refuses
        seen.add((body["duration"], body["resolution"], body["style"]))
    assert len(seen) > 1 or name != "mixed"
    for body in INVALID_REQUESTS:
        with pytest.raises(VidgenError) as info:
            build_plan(parse_request(body), config)
        assert 400 <= info.value.status_code < 500


@pytest.mark.parametrize("name", SCENARIO_NAMES)
def test_scenario_serve_configs_validate(name):
    from vidgen_serve.deploy.k8s import check_serve_config

    scenario = load_scenario(name)
    check_serve_config(scenario_serve_config(scenario))
    assert all(stage["users"] <= 8 for stage in scenario.stages)  # bounded on a 2-core machine
    assert scenario.load_s <= 120
    stages = [s["name"] for s in load_scenario("mixed").stages]
    assert stages == ["ramp", "spike", "soak"]


def test_unknown_scenario_is_named():
    with pytest.raises(ValueError, match=r"scenario 'nope' is unknown .*'autoscale'"):
        load_scenario("nope")


@pytest.mark.slow
def test_short_bounded_run_reports_and_fails_only_on_5xx(tmp_path):
    """The `make loadtest` path on the smoke scenario: a clean run with 429s passes; the same run
    with every denoise call failing (a 5xx for the client) fails. The service starts once."""
    from loadtests.run import LocalService, ReplicaSampler, _session_pids, conclude, measure, min_replicas_of
    from vidgen_serve.deploy.k8s import merge_config

    scenario = load_scenario("smoke")
    config = scenario_serve_config(scenario)
    minimums = min_replicas_of(config)
    with LocalService(config, tmp_path / "service") as service:
        sid = service.proc.pid

        def run(out: Path):
            sampler = ReplicaSampler(service.dashboard_url, service.dashboard_headers(), interval_s=0.5)
            return conclude(*measure(service.url, scenario, out, service.api_key, sampler, minimums))

        passed, reasons, report = run(tmp_path / "clean")
        out = tmp_path / "clean"
        assert passed, reasons
        for name in ("locust_stats.csv", "locust_stats_history.csv", "locust_failures.csv", "replicas.csv",
                     "report.png", "report.html"):
            assert (out / name).stat().st_size > 0, name
        assert report == out / "report.html" and "passed" in report.read_text()
        stats = (out / "locust_stats.csv").read_text()
        assert "generate (shed 429)" in stats  # 3 users on max_inflight_sync=1: shed, not failed
        # Invalid requests were sent and none failed: a 4xx ("invalid"), or shed before their body
        # was read ("invalid (shed 429)": shedding comes first, on max_inflight_sync=1).
        assert ",invalid," in stats or ",invalid (shed " in stats
        replicas = (out / "replicas.csv").read_text()
        assert ",Denoiser,HEALTHY,1," in replicas, replicas[:500]

        faulty = merge_config(service.config, {"applications": [{"name": "vidgen", "deployments": [
            {"name": name, "user_config": {"fault_injection": {"extra_latency_s": 0.0, "error_rate": 1.0}}}
            for name in ("Denoiser", "DenoiserStandby")]}]})
        service.deploy(faulty)
        passed, reasons, report = run(tmp_path / "faulty")
        assert not passed
        assert any("request(s) failed (generate:" in reason for reason in reasons), reasons
        assert "FAILED" in report.read_text()
        assert "503" in (tmp_path / "faulty" / "locust_failures.csv").read_text()
    # Nothing of the service is left running.
    deadline = time.monotonic() + 5
    while _session_pids(sid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _session_pids(sid) == []
