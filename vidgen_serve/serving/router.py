"""The failover router deployment: one place that holds the latency policy's state.

Ingress replicas ask it which denoiser to use (`choose`) and report each denoise call's
latency and work (`record`). It sends the policy's probes with a small canary generation
(`probe_request`): calibration probes from start-up, so each target's probe baseline is
known before anything fails, and recovery probes of the idle target every
`probe_interval_s` while failed over. A probe that outlives its timeout is cancelled and
counts as failed, so a hung target cannot stall the probe loop. Every switch raises an
alert: a structured WARNING log, a Prometheus counter and the active-target gauge, and a
span event.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from ..plan import build_plan
from ..request import VideoRequest
from .failover import TARGETS, LatencyFailover, SwitchEvent
from .settings import ServeSettings
from .telemetry import configure_tracing, tracer

logger = logging.getLogger("vidgen_serve.failover")


class FailoverRouter:
    """Serve deployment around `LatencyFailover` (run it with exactly one replica).

    Args:
        settings: serving settings (`failover` holds the policy's).
        text_encoder: handle used once to encode the canary prompt.
        denoisers: {"primary": handle, "standby": handle}.
    """

    def __init__(self, settings: ServeSettings, text_encoder: Any, denoisers: dict[str, Any]):
        from ray.serve import metrics

        configure_tracing()
        self.policy = LatencyFailover(settings.failover)
        self.text_encoder = text_encoder
        self.denoisers = denoisers
        self.canary_plan = build_plan(VideoRequest.model_validate(settings.probe_request), settings.model)
        self._canary_embeddings = None
        self._probe_task: asyncio.Task | None = None
        self.switches = metrics.Counter(
            "vidgen_failover_switches", description="Denoiser failover alerts by kind.",
            tag_keys=("kind", "from_target", "to_target"),
        )
        self.active_gauge = metrics.Gauge(
            "vidgen_failover_active", description="1 for the denoiser target receiving traffic.",
            tag_keys=("target",),
        )
        self._set_gauge()

    def _set_gauge(self) -> None:
        for target in TARGETS:
            self.active_gauge.set(1 if target == self.policy.active else 0, tags={"target": target})

    def _alert(self, event: SwitchEvent | None) -> None:
        if event is None:
            return
        payload = {"event": "denoiser_failover", **event.to_dict(), "state": self.policy.state}
        logger.warning(json.dumps(payload))
        self.switches.inc(tags={"kind": event.kind, "from_target": event.from_target, "to_target": event.to_target})
        self._set_gauge()
        with tracer().start_as_current_span("failover") as span:
            span.add_event(event.kind, {k: str(v) for k, v in event.to_dict().items()})
        self._ensure_prober()

    # The methods below are async on purpose: they run on the replica's event loop (sync
    # methods run in a thread pool), where the probe loop can be started and alerts raised.
    async def choose(self) -> str:
        """The denoiser target for the next request ("primary" or "standby")."""
        self._ensure_prober()
        return self.policy.active

    async def record(self, target: str, latency_s: float, units: float, ok: bool) -> None:
        """One finished denoise call: its latency, its work (`GenerationPlan.work_units`), whether it succeeded."""
        self._alert(self.policy.record(target, latency_s, units, ok=ok))

    async def snapshot(self) -> dict[str, Any]:
        """State for operators (GET /v1/admin/router)."""
        self._ensure_prober()
        return self.policy.snapshot()

    async def check_health(self) -> None:
        """Serve's periodic health check; also starts the probe loop, so calibration
        begins at start-up rather than with the first request."""
        self._ensure_prober()

    def _ensure_prober(self) -> None:
        if self._probe_task is None or self._probe_task.done():
            self._probe_task = asyncio.get_running_loop().create_task(self._probe_loop())

    async def _probe_loop(self) -> None:
        while True:
            wait = self.policy.seconds_until_next_probe()
            # Capped: a switch can make a probe due sooner than the policy last said.
            await asyncio.sleep(min(wait, 0.5) if wait is not None else 0.5)
            probe = self.policy.next_probe()
            if probe is None:
                continue
            target, kind = probe
            started_at = time.monotonic()  # the policy's clock
            latency, ok = await self._timed_probe(target, kind)
            self._alert(self.policy.record_probe(latency, self.canary_plan.work_units, ok=ok, target=target,
                                                 started_at=started_at))

    async def _timed_probe(self, target: str, kind: str) -> tuple[float, bool]:
        """(seconds, ok) of one canary generation on `target`; a timeout or an error is not ok."""
        timeout = self.policy.settings.effective_probe_timeout_s
        try:
            return await asyncio.wait_for(self._probe(target), timeout=timeout)
        except asyncio.TimeoutError:
            why = f"timed out after {timeout:g}s"
        except Exception as exc:  # noqa: BLE001 - a failed probe is a data point, not a crash
            why = f"failed: {exc!r}"
        # A calibration probe fails while the application is still starting: it is retried.
        logger.log(logging.WARNING if kind == "recovery" else logging.INFO, "%s probe of the %s denoiser %s "
                   "(counts as a failed probe)", kind, target, why)
        return 0.0, False

    async def _probe(self, target: str) -> tuple[float, bool]:
        if self._canary_embeddings is None:
            embeddings, _ = await self.text_encoder.encode.remote(self.canary_plan, None)
            self._canary_embeddings = embeddings
        t0 = time.perf_counter()
        gen = self.denoisers[target].options(stream=True).denoise.remote(self.canary_plan, self._canary_embeddings,
                                                                         None)
        got_latents = False
        try:
            async for item in gen:
                got_latents = got_latents or "latents" in item
        finally:
            if not got_latents:
                gen.cancel()  # timed out or failed: stop the replica's work at its next step boundary
        return time.perf_counter() - t0, got_latents
