"""Failover scenario: time to detect a slow primary and switch, and latency around the switch.

    .venv/bin/python benchmarks/failover_scenario.py [--extra-latency 3.0] [--threshold 1.2]

Starts a local Ray cluster, deploys serve_config.yaml (tiny profile, one replica per
deployment), sends steady traffic, slows the primary denoiser down live through
`user_config.fault_injection`, and prints how many slow calls and seconds the switch took,
the latency of calls served during the switch vs steady state, and the time to fail back.
Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
REQUEST = {"prompt": "a lighthouse at dusk", "duration": 1, "resolution": "480p", "num_inference_steps": 2,
           "seed": 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extra-latency", type=float, default=3.0, help="seconds injected into the primary")
    parser.add_argument("--threshold", type=float, default=1.2, help="failover threshold_ratio")
    parser.add_argument("--steady-calls", type=int, default=6)
    args = parser.parse_args()

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ["VIDGEN_API_KEYS"] = "bench-key"
    os.environ["VIDGEN_ADMIN_KEYS"] = "bench-admin"
    import ray
    from ray import serve

    from vidgen_serve.drill import failover_drill
    from vidgen_serve.net import find_free_port

    port = find_free_port()
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config["http_options"]["port"] = port
    app = config["applications"][0]
    app["args"].update(state_dir=tempfile.mkdtemp(prefix="vidgen-failover-"), probe_request=REQUEST,
                       failover={"threshold_ratio": args.threshold, "consecutive_breaches": 3,
                                 "learn_calls": min(5, args.steady_calls), "probe_interval_s": 1,
                                 "healthy_probes_to_fail_back": 3})
    for dep in app["deployments"]:
        if "autoscaling_config" in dep:
            dep["autoscaling_config"].update(min_replicas=1, max_replicas=1)

    dashboard_port = find_free_port()
    ray.init(address="local", num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=dashboard_port, log_to_driver=False)
    try:
        report = failover_drill(config, f"http://127.0.0.1:{dashboard_port}", f"http://127.0.0.1:{port}",
                                "bench-key", "bench-admin", REQUEST,
                                steady_calls=args.steady_calls, extra_latency_s=args.extra_latency)
    finally:
        serve.shutdown()
        ray.shutdown()

    def fmt(values):
        return f"{statistics.median(values):6.2f} s (n={len(values)})" if values else "   -"

    fault = report.phase("fault")
    print(f"failover scenario: tiny profile, 1 s 480p requests, +{args.extra_latency:g}s on the primary, "
          f"threshold {args.threshold:g}x, 3 consecutive")
    print(f"  all {len(report.calls)} calls succeeded: {all(c.status == 200 for c in report.calls)}")
    print(f"  slow primary calls before the switch: {report.slow_calls_to_switch}")
    print(f"  seconds from fault injection to the first standby-served response: "
          f"{report.seconds_to_switch if report.seconds_to_switch is None else round(report.seconds_to_switch, 2)}")
    print(f"  seconds from recovery to the first primary-served response again: "
          f"{report.seconds_to_fail_back if report.seconds_to_fail_back is None else round(report.seconds_to_fail_back, 2)}")
    print("  median end-to-end latency:")
    print(f"    steady state (primary)        {fmt([c.seconds for c in report.phase('steady')])}")
    print(f"    during the switch (slow prim.) {fmt([c.seconds for c in fault if c.target == 'primary'])}")
    print(f"    after the switch (standby)     {fmt([c.seconds for c in report.calls if c.target == 'standby'])}")
    steady = [c.seconds for c in report.phase("steady")]
    standby = [c.seconds for c in report.calls if c.target == "standby"]
    if steady and standby:
        print(f"  ratio standby / steady: {statistics.median(standby) / statistics.median(steady):.2f}")


if __name__ == "__main__":
    main()
