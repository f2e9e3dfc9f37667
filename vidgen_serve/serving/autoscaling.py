"""Queue-driven autoscaling: jobs waiting in the store count as work for the stage deployments.

Queued jobs are not requests the stages see yet, so Serve's default policy (ongoing
requests per replica) would scale the denoisers only once jobs are dispatched, one
`max_running_jobs` batch at a time. Here every stage replica reports the store's queue
depth as a custom autoscaling metric (`record_autoscaling_stats` -> `QueueDepthProbe`),
and the deployment's custom policy (`queue_depth_policy`, set as `AutoscalingConfig(policy=...)`)
adds it to the ongoing requests:

    desired replicas = (ongoing requests + queued jobs) / target_ongoing_requests

Serve then applies the deployment's own min/max replicas, up/down-scaling delays and
factors to that number, exactly as for its built-in policy. 50 queued jobs therefore
raise the Denoiser's target before any of them is dispatched, and an empty queue lets it
fall back to what its live requests need.
"""

from __future__ import annotations

import logging
import time
from typing import Any

logger = logging.getLogger("vidgen_serve.autoscaling")

QUEUED_JOBS_METRIC = "queued_jobs"
POLICY_IMPORT_PATH = "vidgen_serve.serving.autoscaling:queue_depth_policy"


def queue_depth_policy(ctx: Any) -> tuple[float, dict[str, Any]]:
    """Ray Serve custom autoscaling policy (deployment scope): requests plus queued jobs.

    Args:
        ctx: Serve's `AutoscalingContext` for one deployment.

    Returns:
        (desired replicas before Serve applies bounds and delays, policy state).
    """
    metrics = ctx.aggregated_metrics or {}
    per_replica = metrics.get(QUEUED_JOBS_METRIC) or {}
    # Every replica reads the same store: take the largest report, not the sum.
    queued = max(per_replica.values(), default=0.0)
    if ctx.current_num_replicas == 0:
        return (1 if ctx.total_num_requests + queued > 0 else 0), {QUEUED_JOBS_METRIC: queued}
    per_replica_target = ctx.config.get_target_ongoing_requests()
    desired = (ctx.total_num_requests + queued) / per_replica_target
    return desired, {QUEUED_JOBS_METRIC: queued}


def policy_config() -> dict[str, Any]:
    """The `policy` entry of an `autoscaling_config` that selects `queue_depth_policy`."""
    return {"policy_function": POLICY_IMPORT_PATH}


class QueueDepthProbe:
    """What a stage replica reports from `record_autoscaling_stats`: the job store's queue depth.

    Opens its own connection to the configured store on first use; when the store cannot
    be read it reports the last known depth (a store outage must not scale the stages down).

    Args:
        settings: serving settings (`job_store`, `job_store_namespace`, `state_dir`).
        min_interval_s: reads the store at most this often (Serve asks every few seconds).
    """

    def __init__(self, settings: Any, min_interval_s: float = 1.0):
        self._settings = settings
        self._store: Any = None
        self._depth = 0
        self._read_at = float("-inf")
        self._min_interval_s = min_interval_s

    async def depth(self) -> int:
        """Jobs waiting in the store (cached for `min_interval_s`)."""
        now = time.monotonic()
        if now - self._read_at < self._min_interval_s:
            return self._depth
        self._read_at = now
        try:
            if self._store is None:
                store = self._settings.open_job_store()
                await store.start()
                self._store = store
            self._depth = await self._store.queue_depth()
        except Exception as exc:  # noqa: BLE001 - keep the last value; the ingress reports the outage
            logger.warning("queue depth unavailable (%s); reporting the last value %d", exc, self._depth)
        return self._depth

    async def stats(self) -> dict[str, float]:
        """The custom autoscaling metrics of a stage replica."""
        return {QUEUED_JOBS_METRIC: float(await self.depth())}

    async def close(self) -> None:
        if self._store is not None:
            await self._store.close()
            self._store = None
