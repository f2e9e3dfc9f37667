"""The failover router deployment: one place that holds the latency policy's state.

Ingress replicas ask it which denoiser to use (`choose`) and report each denoise call's
latency and work (`record`). While failed over it probes the idle target with a small
canary generation every `probe_interval_s`. Every switch raises an alert: a structured
WARNING log, a Prometheus counter and the active-target gauge, and a span event.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from ..plan import build_plan
from ..request import VideoRequest
from .failover import TARGETS, LatencyFailover, SwitchEvent, work_units
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

    async def record(self, target: str, latency_s: float, steps: int, tokens: int, ok: bool) -> None:
        """One finished denoise call: its latency, its work and whether it succeeded."""
        self._alert(self.policy.record(target, latency_s, work_units(steps, tokens), ok=ok))

    async def snapshot(self) -> dict[str, Any]:
        """State for operators (GET /v1/admin/router)."""
        return self.policy.snapshot()

    def _ensure_prober(self) -> None:
        if self._probe_task is None or self._probe_task.done():
            self._probe_task = asyncio.get_running_loop().create_task(self._probe_loop())

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            target = self.policy.probe_target
            if target is None or not self.policy.probe_due():
                continue
            try:
                latency, ok = await self._probe(target)
            except Exception as exc:  # noqa: BLE001 - a failed probe is a data point, not a crash
                logger.warning("probe of the %s denoiser failed: %r", target, exc)
                latency, ok = 0.0, False
            plan = self.canary_plan
            self._alert(self.policy.record_probe(latency, work_units(plan.num_inference_steps, plan.window_tokens),
                                                 ok=ok, target=target))

    async def _probe(self, target: str) -> tuple[float, bool]:
        if self._canary_embeddings is None:
            embeddings, _ = await self.text_encoder.encode.remote(self.canary_plan, None)
            self._canary_embeddings = embeddings
        t0 = time.perf_counter()
        gen = self.denoisers[target].options(stream=True).denoise.remote(self.canary_plan, self._canary_embeddings,
                                                                         None)
        got_latents = False
        async for item in gen:
            got_latents = got_latents or "latents" in item
        return time.perf_counter() - t0, got_latents


