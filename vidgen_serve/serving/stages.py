"""The three stage deployments: thin wrappers over the plain stage classes.

Each loads its model once per replica, opens a child span per call from the carrier the
ingress passes, records per-stage metrics, and returns tensors/bytes through Ray.
The builder wraps these classes with `serve.deployment(...)`; tests may construct them
directly inside a Ray worker.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Callable

from ..config import AppConfig
from ..errors import VidgenError
from ..models.loading import resolve_checkpoint
from ..pipeline.decoder import Decoder
from ..pipeline.denoiser import Denoiser
from ..pipeline.text_encoder import PromptEmbeddings, TextEncoder
from ..plan import GenerationPlan
from .faults import FaultInjection, inject_faults
from .telemetry import StageMetrics, child_span, configure_tracing

logger = logging.getLogger("vidgen_serve.stages")


class TextEncoderDeployment:
    """Serve wrapper of `TextEncoder`."""

    def __init__(self, config: AppConfig):
        configure_tracing()
        self.stage = TextEncoder(config)
        self.metrics = StageMetrics("text_encode")

    def encode(self, plan: GenerationPlan, carrier: dict | None = None) -> tuple[PromptEmbeddings, dict[str, float]]:
        """Embeddings for the plan, and {"text_encode": seconds}."""
        with child_span("text_encode", carrier, prompts=len(plan.prompts)) as span:
            t0 = time.perf_counter()
            try:
                embeddings = self.stage.encode(plan)
            except Exception:
                self.metrics.failed("error")
                raise
            seconds = time.perf_counter() - t0
            span.set_attribute("cache_hits", embeddings.cache_hits)
        self.metrics.observe(seconds, self.stage.device.type)
        if embeddings.cache_hits:
            self.metrics.cache.inc(embeddings.cache_hits, tags={"result": "hit"})
        if embeddings.cache_misses:
            self.metrics.cache.inc(embeddings.cache_misses, tags={"result": "miss"})
        return embeddings, {"text_encode": seconds}

    def count_tokens(self, texts: list[str]) -> dict[str, Any]:
        """Token counts of `texts` and the encoder's limit (for /v1/prompt/analyze)."""
        return {"tokens": [self.stage.count_tokens(t) for t in texts], "limit": self.stage.max_sequence_length}


class DenoiserDeployment:
    """Serve wrapper of `Denoiser` (or of a parallel worker group of them: TP, Ulysses, CFG).

    `denoise` is an async generator: it yields {"progress": ...} after every (step,
    window) unit and finally {"latents": ..., "timings": ...}. Each unit runs on this
    replica's worker thread; when the caller cancels (client gone, deadline, DELETE),
    the generator stops at the next unit boundary.
    """

    def __init__(self, config: AppConfig, role: str = "primary", retry_after_s: int = 5):
        configure_tracing()
        self.role = role
        self.retry_after_s = retry_after_s
        profile = config.model_profile
        if profile.parallel.size > 1:  # a worker group: {tp, ulysses, cfg} ranks
            from ..parallel.group import ParallelDenoiser

            self.stage: Any = ParallelDenoiser(config)
        else:
            self.stage = Denoiser(config, resolve_checkpoint(config))
        self.device_type = profile.device
        self.metrics = StageMetrics("denoise")
        self.faults = FaultInjection()
        # One run at a time per replica; steps of a run execute in order on this thread.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"denoise-{role}")

    def reconfigure(self, user_config: dict | None) -> None:
        """Apply `user_config` live: `{"fault_injection": {...}}` (see `FaultInjection`)."""
        self.faults = _faults_from(user_config, f"{self.role} denoiser")

    async def denoise(
        self, plan: GenerationPlan, embeddings: PromptEmbeddings, carrier: dict | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        with child_span("denoise", carrier, role=self.role, steps=plan.num_inference_steps,
                        windows=len(plan.windows)):
            t0 = time.perf_counter()
            try:
                await inject_faults(self.faults, f"{self.role} denoiser")
                run = await loop.run_in_executor(self._executor, self.stage.start, plan, embeddings)
                try:
                    while not run.done:
                        event = await loop.run_in_executor(self._executor, run.advance)
                        yield {"progress": event}
                    latents = await loop.run_in_executor(self._executor, run.latents)
                finally:
                    release = getattr(run, "release", None)  # TP runs hold state on every rank
                    if release is not None:
                        self._executor.submit(release)
            except asyncio.CancelledError:
                self.metrics.failed("cancelled")
                raise
            except Exception as exc:
                self.metrics.failed("error")
                if getattr(self.stage, "broken", False):
                    # A rank died: this replica fails its health check and Serve replaces it.
                    raise VidgenError(503, f"the {self.role} denoiser's parallel worker group failed ({exc}); "
                                           "its replica is being replaced, retry", code="stage_unavailable",
                                      headers={"Retry-After": str(self.retry_after_s)}) from exc
                raise
            seconds = time.perf_counter() - t0
        self.metrics.observe(seconds, self.device_type)
        yield {"latents": latents, "timings": {"denoise": seconds}, "role": self.role}

    def check_health(self) -> None:
        """Serve calls this periodically; a broken parallel worker group makes the replica unhealthy."""
        check = getattr(self.stage, "check_health", None)
        if check is not None:
            check()

    def __del__(self):
        close = getattr(getattr(self, "stage", None), "close", None)
        if close is not None:
            try:
                close()
            except Exception:  # interpreter shutdown: nothing useful to do
                pass


class DecoderDeployment:
    """Serve wrapper of `Decoder`: latents in, MP4 bytes out.

    `decode` is an async generator: it yields {"progress": {"phase": "vae_decode" |
    "encode", "fraction": f}} while it works and finally {"mp4": bytes, "timings": ...}.
    """

    def __init__(self, config: AppConfig):
        configure_tracing()
        self.stage = Decoder(config)
        self.metrics = StageMetrics("decode")
        self.faults = FaultInjection()

    def reconfigure(self, user_config: dict | None) -> None:
        """Apply `user_config` live: `{"fault_injection": {...}}` (see `FaultInjection`)."""
        self.faults = _faults_from(user_config, "decoder")

    async def decode(
        self, plan: GenerationPlan, latents: Any, carrier: dict | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """Progress events, then the MP4 bytes and {"vae_decode": s, "encode": s}.

        Runs on a worker thread; when the caller cancels (deadline, client gone), ffmpeg
        is stopped instead of finishing a video nobody will receive.
        """
        cancel = threading.Event()
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[dict] = asyncio.Queue()
        with child_span("decode", carrier, output=f"{plan.output_width}x{plan.output_height}"):
            t0 = time.perf_counter()
            waiting: asyncio.Future | None = None
            try:
                await inject_faults(self.faults, "decoder")
                work = loop.run_in_executor(None, self._decode_to_bytes, plan, latents, cancel,
                                            lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
                while True:
                    waiting = asyncio.ensure_future(events.get())
                    await asyncio.wait({waiting, work}, return_when=asyncio.FIRST_COMPLETED)
                    if not waiting.done():
                        break
                    yield {"progress": waiting.result()}
                waiting.cancel()
                while not events.empty():
                    yield {"progress": events.get_nowait()}
                data, timings = await work
            except (asyncio.CancelledError, GeneratorExit):
                cancel.set()
                self.metrics.failed("cancelled")
                raise
            except Exception:
                self.metrics.failed("error")
                raise
            finally:
                if waiting is not None:
                    waiting.cancel()
        self.metrics.observe(time.perf_counter() - t0, self.stage.device.type)
        yield {"mp4": data, "timings": timings}

    def _decode_to_bytes(self, plan: GenerationPlan, latents: Any, cancel: threading.Event,
                         progress: Callable[[dict], None]):
        with tempfile.TemporaryDirectory(prefix="vidgen-decode-") as tmp:
            path = os.path.join(tmp, "video.mp4")
            timings = self.stage.decode(plan, latents, path, cancel, progress=progress)
            with open(path, "rb") as f:
                return f.read(), timings


def _faults_from(user_config: dict | None, stage: str) -> FaultInjection:
    faults = FaultInjection.model_validate((user_config or {}).get("fault_injection") or {})
    if faults != FaultInjection():
        logger.warning("fault injection active on the %s: %s", stage, faults.model_dump())
    return faults
