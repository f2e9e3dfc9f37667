"""The three stage deployments: thin wrappers over the plain stage classes.

Each loads its model once per replica and wraps every call in `telemetry.stage_call`
(a child span from the carrier the ingress passes, the latency histogram, the failure
counter). Tensors travel through Ray; MP4s of async jobs go to the artifact store (the
Decoder writes them and returns only timings and quality metrics), and only the sync
endpoint gets MP4 bytes.
Each replica reports the job store's queue depth to Serve's autoscaler
(`record_autoscaling_stats`, see `serving/autoscaling.py`). The builder wraps these
classes with `serve.deployment(...)`; tests may construct them directly inside a Ray worker.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Awaitable, Callable

from ..config import AppConfig
from ..errors import VidgenError
from ..models.loading import resolve_checkpoint
from ..pipeline.decoder import Decoder, DecodeResult
from ..pipeline.denoiser import Denoiser
from ..pipeline.text_encoder import PromptEmbeddings, TextEncoder
from ..plan import GenerationPlan
from .autoscaling import QueueDepthProbe
from .faults import FaultInjection, inject_faults
from .quality_telemetry import QualityHistograms
from .style_multiplex import StyleMultiplexer
from .telemetry import StageMetrics, child_span, configure_tracing, stage_call

logger = logging.getLogger("vidgen_serve.stages")


def lower_cpu_priority(settings: Any) -> int:
    """Make this stage replica's process nicer by `settings.stage_nice` (every thread it has now;
    threads and processes it starts later, torch's pool and ffmpeg included, inherit it).

    On Linux a niceness belongs to a thread, so each task of the process is reniced, not only the
    calling one. Returns the niceness applied (0: unchanged, no settings, or not permitted).
    """
    increment = getattr(settings, "stage_nice", 0) if settings is not None else 0
    if increment <= 0 or not hasattr(os, "setpriority"):
        return 0
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = [0]
    applied = 0
    for tid in tids:
        try:
            target = min(19, os.getpriority(os.PRIO_PROCESS, tid) + increment)
            os.setpriority(os.PRIO_PROCESS, tid, target)
            applied = target
        except OSError:  # a thread that just ended, or a sandbox that forbids it
            continue
    if applied:
        logger.info("stage replica niceness now %d (stage_nice=%d)", applied, increment)
    return applied


class _QueueDepthStats:
    """`record_autoscaling_stats` for a stage deployment: the job store's queue depth."""

    queue: QueueDepthProbe | None = None

    def _watch_queue(self, settings: Any) -> None:
        self.queue = QueueDepthProbe(settings) if settings is not None else None

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Custom autoscaling metrics Serve collects from this replica (queued jobs)."""
        return await self.queue.stats() if self.queue is not None else {}


class TextEncoderDeployment(_QueueDepthStats):
    """Serve wrapper of `TextEncoder`.

    Args:
        config: the application config.
        settings: serving settings (where the job store is, for queue-driven autoscaling).
    """

    def __init__(self, config: AppConfig, settings: Any = None):
        configure_tracing()
        lower_cpu_priority(settings)
        self.stage = TextEncoder(config)
        self.metrics = StageMetrics("text_encode")
        self._watch_queue(settings)

    def encode(self, plan: GenerationPlan, carrier: dict | None = None) -> tuple[PromptEmbeddings, dict[str, float]]:
        """Embeddings for the plan, and {"text_encode": seconds}."""
        with stage_call(self.metrics, carrier, self.stage.device.type, prompts=len(plan.prompts)) as call:
            embeddings = self.stage.encode(plan)
            call.span.set_attribute("cache_hits", embeddings.cache_hits)
        if embeddings.cache_hits:
            self.metrics.cache.inc(embeddings.cache_hits, tags={"result": "hit"})
        if embeddings.cache_misses:
            self.metrics.cache.inc(embeddings.cache_misses, tags={"result": "miss"})
        return embeddings, {"text_encode": call.seconds}

    def count_tokens(self, texts: list[str]) -> dict[str, Any]:
        """Token counts of `texts` and the encoder's limit (for /v1/prompt/analyze)."""
        return {"tokens": [self.stage.count_tokens(t) for t in texts], "limit": self.stage.max_sequence_length}

    def tokens(self, text: str) -> dict[str, Any]:
        """The tokens of `text` as the encoder sees them (labels, spans, positions; for attention maps)."""
        return self.stage.tokens(text)


class DenoiserDeployment(_QueueDepthStats):
    """Serve wrapper of `Denoiser` (or of a parallel worker group of them: TP, Ulysses, CFG).

    `denoise` is an async generator: it yields {"progress": ...} after every (step,
    window) unit (unless the caller passes progress=False: each item is a round trip
    through Ray, and a sync request has nobody to show them to) and finally
    {"latents": ..., "timings": ...}. Each unit runs on this
    replica's worker thread; when the caller cancels (client gone, deadline, DELETE),
    the generator stops at the next unit boundary.
    """

    def __init__(self, config: AppConfig, role: str = "primary", settings: Any = None):
        configure_tracing()
        lower_cpu_priority(settings)
        self.role = role
        # 503s say when to retry (the deployment's `retry_after_s`, as the ingress's do).
        self.retry_after_s = settings.retry_after_s if settings is not None else 5
        self._watch_queue(settings)
        profile = config.model_profile
        max_styles = settings.max_styles_per_replica if settings is not None else 4
        if profile.parallel.size > 1:  # a worker group: {tp, ulysses, cfg} ranks
            from ..parallel.group import ParallelDenoiser

            self.stage: Any = ParallelDenoiser(config, max_styles=max_styles)
        else:
            self.stage = Denoiser(config, resolve_checkpoint(config), max_styles=max_styles)
        self.device_type = profile.device
        self.metrics = StageMetrics("denoise")
        self.faults = FaultInjection()
        # One run at a time per replica; steps of a run execute in order on this thread.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"denoise-{role}")
        # Style LoRA adapters through Serve's model multiplexing (serving/style_multiplex.py).
        self.styles = StyleMultiplexer(self.stage, self._executor, max_styles, role)

    def reconfigure(self, user_config: dict | None) -> None:
        """Apply `user_config` live: `{"fault_injection": {...}}` (see `FaultInjection`)."""
        self.faults = _faults_from(user_config, f"{self.role} denoiser")

    async def denoise(
        self, plan: GenerationPlan, embeddings: PromptEmbeddings, carrier: dict | None = None, progress: bool = True
    ) -> AsyncIterator[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        with stage_call(self.metrics, carrier, self.device_type, role=self.role, steps=plan.num_inference_steps,
                        windows=len(plan.windows)) as call:
            try:
                await inject_faults(self.faults, f"{self.role} denoiser")
                await self.styles.ensure()  # the request's style adapter (multiplexed model id)
                run = await loop.run_in_executor(self._executor, self.stage.start, plan, embeddings)
                try:
                    while not run.done:
                        event = await loop.run_in_executor(self._executor, run.advance)
                        if progress:
                            yield {"progress": event}
                    latents = await loop.run_in_executor(self._executor, run.latents)
                finally:
                    release = getattr(run, "release", None)  # TP runs hold state on every rank
                    if release is not None:
                        self._executor.submit(release)
            except Exception as exc:
                if getattr(self.stage, "broken", False):
                    # A rank died: this replica fails its health check and Serve replaces it.
                    raise VidgenError(503, f"the {self.role} denoiser's parallel worker group failed ({exc}); "
                                           "its replica is being replaced, retry", code="stage_unavailable",
                                      headers={"Retry-After": str(self.retry_after_s)}) from exc
                raise
        yield {"latents": latents, "timings": {"denoise": call.seconds}, "role": self.role}

    async def attention(self, plan: GenerationPlan, embeddings: PromptEmbeddings, tokens: dict[str, Any],
                        prompt: str, carrier: dict | None = None) -> dict[str, Any]:
        """Run `plan` (an attention plan) while capturing cross-attention; the maps' document and PNG
        (see `pipeline.attention_maps`). On this replica's worker thread, between other runs."""
        from ..pipeline.attention_maps import attention_maps

        if not isinstance(self.stage, Denoiser):
            raise VidgenError(501, "attention maps need a single-process denoiser, not a parallel worker group",
                              code="not_implemented")
        loop = asyncio.get_running_loop()
        # Its own span, not the denoise latency histogram (a debugging run is not a generation).
        with child_span("attention", carrier, role=self.role, steps=plan.num_inference_steps):
            maps = await loop.run_in_executor(self._executor, attention_maps, self.stage, plan, embeddings, tokens,
                                              prompt)
        return {**maps.document(), "png": maps.png}

    async def style_stats(self) -> dict[str, Any]:
        """Style adapters of this replica: loaded (LRU order), load counts, evictions, and what Serve's
        multiplexing holds and routed here."""
        stats = await asyncio.get_running_loop().run_in_executor(self._executor, self.stage.style_stats)
        return {**stats, **self.styles.stats()}

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


class DecoderDeployment(_QueueDepthStats):
    """Serve wrapper of `Decoder`: latents in; MP4 bytes out (sync requests) or the MP4 written
    to the artifact store (async jobs).

    `decode` and `decode_to_store` are async generators: they yield {"progress": {"phase":
    "vae_decode" | "encode", "fraction": f}} while they work (unless the caller passes
    progress=False) and finally {"mp4": bytes, "timings": ..., "quality": ...} / {"timings": ...,
    "quality": ...}, where "quality" holds the video's quality metrics (`media.quality`), also
    recorded in this replica's histograms.

    Args:
        config: the application config.
        settings: serving settings: the artifact store (checked when the replica starts: a
            bucket that does not exist or denies writes fails the start, naming it) and the
            job store (queue-driven autoscaling). None: bytes only, no autoscaling stats.
    """

    async def __init__(self, config: AppConfig, settings: Any = None):
        configure_tracing()
        lower_cpu_priority(settings)
        self.artifacts = None
        if settings is not None:  # checked before the model loads: a bad store fails fast
            self.artifacts = settings.open_artifact_store()
            await self.artifacts.start()
        self.stage = Decoder(config)
        self.metrics = StageMetrics("decode")
        self.quality_histograms = QualityHistograms(config.model_profile.name)
        self.faults = FaultInjection()
        self._watch_queue(settings)

    def reconfigure(self, user_config: dict | None) -> None:
        """Apply `user_config` live: `{"fault_injection": {...}}` (see `FaultInjection`)."""
        self.faults = _faults_from(user_config, "decoder")

    async def decode(
        self, plan: GenerationPlan, latents: Any, carrier: dict | None = None, progress: bool = True
    ) -> AsyncIterator[dict[str, Any]]:
        """Progress events, then the MP4 bytes, {"vae_decode": s, ...} and the quality metrics (the sync endpoint)."""
        async def with_bytes(path: str, result: dict[str, Any]) -> dict[str, Any]:
            return {"mp4": await asyncio.to_thread(_read_file, path), **result}

        async for item in self._decode_then(plan, latents, carrier, progress, with_bytes):
            yield item

    async def decode_to_store(
        self, plan: GenerationPlan, latents: Any, key: str, carrier: dict | None = None, progress: bool = True
    ) -> AsyncIterator[dict[str, Any]]:
        """Progress events, then the MP4 stored under `key` in the artifact store and {"timings":
        ... + "store", "quality": ...}. Ends only once the store has the whole file; an upload
        that fails raises (503) with the store's reason."""
        if self.artifacts is None:
            raise VidgenError(500, "the decoder has no artifact store", code="stage_error")

        async def stored(path: str, result: dict[str, Any]) -> dict[str, Any]:
            t0 = time.perf_counter()
            await self.artifacts.put_file(key, path)
            result["timings"]["store"] = time.perf_counter() - t0
            return result

        async for item in self._decode_then(plan, latents, carrier, progress, stored):
            yield item

    async def _decode_then(self, plan: GenerationPlan, latents: Any, carrier: dict | None, progress: bool,
                           finish: Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]
                           ) -> AsyncIterator[dict[str, Any]]:
        """Decode into a temporary MP4, yielding progress; then yield `finish(path, result)` (the file
        still exists while it runs; it is removed afterwards)."""
        with tempfile.TemporaryDirectory(prefix="vidgen-decode-") as tmp:
            path = os.path.join(tmp, "video.mp4")
            result: dict[str, Any] = {"timings": {}}
            async for item in self._decode_file(plan, latents, path, carrier, progress):
                if "progress" in item:
                    yield item
                else:
                    result = item
            final = await finish(path, result)
        yield final

    async def _decode_file(self, plan: GenerationPlan, latents: Any, path: str, carrier: dict | None,
                           progress: bool) -> AsyncIterator[dict[str, Any]]:
        # On a worker thread; when the caller cancels (deadline, client gone, job cancelled),
        # ffmpeg is stopped instead of finishing a video nobody will receive. Phase progress
        # crosses from that thread through a queue on this loop.
        cancel = threading.Event()
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[dict] = asyncio.Queue()
        report: Callable[[dict], None] | None = (
            (lambda event: loop.call_soon_threadsafe(events.put_nowait, event)) if progress else None)
        waiting: asyncio.Future | None = None
        with stage_call(self.metrics, carrier, self.stage.device.type,
                        output=f"{plan.output_width}x{plan.output_height}"):
            try:
                await inject_faults(self.faults, "decoder")
                work = loop.run_in_executor(None, self._decode_on_thread, plan, latents, path, cancel, report)
                while True:
                    waiting = asyncio.ensure_future(events.get())
                    await asyncio.wait({waiting, work}, return_when=asyncio.FIRST_COMPLETED)
                    if not waiting.done():
                        break
                    yield {"progress": waiting.result()}
                while not events.empty():
                    yield {"progress": events.get_nowait()}
                decoded = await work
            except (asyncio.CancelledError, GeneratorExit):
                cancel.set()
                raise
            finally:
                if waiting is not None:
                    waiting.cancel()
        self.quality_histograms.observe(decoded.quality)
        yield {"timings": decoded.timings, "quality": decoded.quality}

    def _decode_on_thread(self, plan: GenerationPlan, latents: Any, path: str, cancel: threading.Event,
                          progress: Callable[[dict], None] | None) -> DecodeResult:
        return self.stage.decode(plan, latents, path, cancel, progress=progress)


def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _faults_from(user_config: dict | None, stage: str) -> FaultInjection:
    faults = FaultInjection.model_validate((user_config or {}).get("fault_injection") or {})
    if faults != FaultInjection():
        logger.warning("fault injection active on the %s: %s", stage, faults.model_dump())
    return faults
