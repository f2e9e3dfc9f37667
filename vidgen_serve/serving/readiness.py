"""Readiness of the application for `GET /readyz`.

Ready means every deployment can serve: it has at least one RUNNING replica. A
deployment's overall status is not the test: Serve reports UPSCALING / DOWNSCALING while
the autoscaler changes the replica count (and UPDATING during a rolling update) although
running replicas keep serving; a Kubernetes readiness probe keyed on "HEALTHY" would pull
the pod during routine scaling.

The status comes from `serve.status()`, a blocking call to the Serve controller: it runs
on a worker thread, never on the ingress's event loop, and one answer is shared by every
probe for `max_age_s` (concurrent probes wait for the same call instead of each asking).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable, Mapping

RUNNING = "RUNNING"


def readiness(deployments: Mapping[str, Any]) -> tuple[bool, dict[str, dict[str, Any]]]:
    """Whether every deployment has a running replica, and a per-deployment summary.

    Args:
        deployments: ``{name: DeploymentStatusOverview}`` of one application (anything with
            ``status`` and ``replica_states``).

    Returns:
        ``(ready, {name: {"status", "running_replicas", "ready"}})``; no deployments is
        not ready.
    """
    summary = {}
    for name, overview in deployments.items():
        running = int(dict(overview.replica_states or {}).get(RUNNING, 0))
        summary[name] = {"status": str(getattr(overview.status, "value", overview.status)),
                         "running_replicas": running, "ready": running > 0}
    return bool(summary) and all(d["ready"] for d in summary.values()), summary


class ReadinessCheck:
    """Readiness of one application, fetched off the event loop and cached briefly.

    Args:
        fetch: blocking callable returning ``{deployment name: DeploymentStatusOverview}``.
        max_age_s: how long one answer is reused.
        clock: monotonic clock (injectable for tests).
    """

    def __init__(self, fetch: Callable[[], Mapping[str, Any]], max_age_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._fetch = fetch
        self._max_age_s = max_age_s
        self._clock = clock
        self._answer: tuple[float, tuple[bool, dict]] | None = None
        self._pending: asyncio.Future | None = None

    async def check(self) -> tuple[bool, dict[str, dict[str, Any]]]:
        """``readiness(...)`` of the current status (raises what the fetch raised)."""
        if self._answer is not None and self._clock() - self._answer[0] < self._max_age_s:
            return self._answer[1]
        if self._pending is None or self._pending.done():
            self._pending = asyncio.ensure_future(self._refresh())
        # shield: a probe that gives up (client gone) must not cancel the shared call.
        return await asyncio.shield(self._pending)

    async def _refresh(self) -> tuple[bool, dict[str, dict[str, Any]]]:
        answer = readiness(await asyncio.to_thread(self._fetch))
        self._answer = (self._clock(), answer)
        return answer


def serve_deployments(app_name: str) -> Mapping[str, Any]:
    """``{deployment name: DeploymentStatusOverview}`` of `app_name`, from `serve.status()` (blocking)."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None:
        raise LookupError(f"application {app_name!r} is not deployed")
    return app.deployments
