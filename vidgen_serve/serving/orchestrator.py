"""The generation orchestrator: text encode -> router -> denoise -> decode, for one plan.

A plain class over deployment handles (anything with `.method.remote(...)` returning an
awaitable, and `.options(stream=True)` for the denoiser's progress stream), so tests can
drive it with fake handles and no Ray. The ingress uses it for sync requests; the job
runner uses it for async jobs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from ..errors import GenerationCancelled, VidgenError
from ..plan import GenerationPlan
from .progress import StageShares
from .telemetry import carrier_for_current_span, tracer

logger = logging.getLogger("vidgen_serve.orchestrator")

StageCallback = Callable[[str], Awaitable[None]]
ProgressCallback = Callable[[dict], Awaitable[None]]


@dataclass
class GenerationResult:
    """What one generation produced.

    `mp4` holds the bytes (sync requests); `artifact` the artifact-store key the Decoder
    wrote (async jobs): then no video bytes travel through Ray to the ingress. `quality`: the
    video's quality metrics, as the Decoder computed them (`media.quality`).
    """

    timings: dict[str, float]
    denoiser: str
    text_cache: str
    mp4: bytes | None = None
    artifact: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    quality: dict[str, float] = field(default_factory=dict)


def map_stage_error(stage: str, exc: BaseException, retry_after_s: int = 5) -> VidgenError:
    """Downstream failures as client-safe errors (the full error is logged); 503s say when to retry."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    retry = {"Retry-After": str(retry_after_s)}
    if isinstance(exc, VidgenError):
        # Raised in a replica, it arrives as RayTaskError(VidgenError): answer with the original.
        cause = getattr(exc, "cause", None)
        return cause if isinstance(cause, VidgenError) else exc
    if isinstance(exc, BackPressureError):
        return VidgenError(503, f"the {stage} stage is at capacity; retry later", code="overloaded", headers=retry)
    if isinstance(exc, (RayActorError, ActorDiedError, ActorUnavailableError, DeploymentUnavailableError)):
        logger.error("%s stage replica failed: %s", stage, exc)
        return VidgenError(503, f"the {stage} stage failed (its replica stopped); retry", code="stage_unavailable",
                           headers=retry)
    logger.error("%s stage error: %r", stage, exc)
    return VidgenError(500, f"the {stage} stage failed", code="stage_error")


class GenerationOrchestrator:
    """Runs one plan through the stage deployments.

    Args:
        text_encoder, decoder: handles of the stage deployments.
        denoisers: {"primary": handle, "standby": handle} (standby optional).
        router: handle of the failover router, or None to always use the primary.
        retry_after_s: the `Retry-After` of the 503s it answers for failed stages.

    `stage_shares` learns each stage's share of a generation's time from the generations it
    finished (the job runner turns stage progress into one overall fraction and ETA with it).
    """

    def __init__(self, text_encoder: Any, denoisers: dict[str, Any], decoder: Any, router: Any = None,
                 retry_after_s: int = 5):
        self.text_encoder = text_encoder
        self.denoisers = denoisers
        self.decoder = decoder
        self.router = router
        self.retry_after_s = retry_after_s
        self.stage_shares = StageShares()
        self._reports: set[asyncio.Future] = set()

    async def _call(self, stage: str, awaitable: Awaitable) -> Any:
        try:
            return await awaitable
        except (asyncio.CancelledError, GenerationCancelled):
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a client-safe error
            raise map_stage_error(stage, exc, self.retry_after_s) from exc

    async def count_tokens(self, texts: list[str]) -> dict[str, Any]:
        """Token counts of `texts` and the text encoder's limit."""
        return await self._call("text_encode", self.text_encoder.count_tokens.remote(texts))

    async def _choose_denoiser(self) -> str:
        if self.router is None or self.denoisers.get("standby") is None:
            return "primary"
        try:
            return await self.router.choose.remote()
        except Exception as exc:  # the router is advisory: never fail a request over it
            logger.warning("failover router unavailable (%r); using the primary denoiser", exc)
            return "primary"

    def _report(self, target: str, seconds: float, plan: GenerationPlan, ok: bool) -> None:
        """Tell the router how the call went, off the request's path: the call is sent now and its
        answer (nothing) is awaited in the background, not before the decode starts."""
        if self.router is None:
            return
        try:
            response = self.router.record.remote(target, seconds, plan.work_units, ok)
        except Exception as exc:
            logger.warning("could not report to the failover router: %r", exc)
            return

        async def settle() -> None:
            try:
                await response
            except Exception as exc:
                logger.warning("could not report to the failover router: %r", exc)

        task = asyncio.ensure_future(settle())
        self._reports.add(task)  # a strong reference until it ends
        task.add_done_callback(self._reports.discard)

    async def denoise(self, plan: GenerationPlan, embeddings: Any, carrier: dict,
                      on_progress: ProgressCallback | None = None,
                      choice: Awaitable[str] | None = None) -> tuple[Any, dict[str, float], str]:
        """Denoise on the router's choice; if that target fails, once more on the other one.

        A failed call is reported to the router first (errors count as breaches), so a
        broken primary is still failed over; meanwhile no accepted request is lost to it.
        `choice`: the router's answer, asked for earlier (e.g. while the text was encoded).
        """
        target = await (choice if choice is not None else self._choose_denoiser())
        try:
            return await self._denoise_on(target, plan, embeddings, carrier, on_progress)
        except VidgenError as exc:
            other = "standby" if target == "primary" else "primary"
            if exc.status_code < 500 or exc.code == "style_unavailable" or self.denoisers.get(other) is None:
                raise  # (a style whose adapter can't be read is unavailable on every target alike)
            logger.warning("denoise on the %s failed (%s); retrying on the %s", target, exc.message, other)
            return await self._denoise_on(other, plan, embeddings, carrier, on_progress)

    async def _denoise_on(self, target: str, plan: GenerationPlan, embeddings: Any, carrier: dict,
                          on_progress: ProgressCallback | None) -> tuple[Any, dict[str, float], str]:
        handle = self.denoisers[target]
        if plan.style_lora:  # route to replicas that hold the style's adapter (Serve model multiplexing)
            handle = handle.options(multiplexed_model_id=plan.style)
        gen = handle.options(stream=True).denoise.remote(plan, embeddings, carrier, on_progress is not None)
        t0 = time.perf_counter()
        outcome = "error"
        try:
            final = await self._read_stream("denoise", gen, on_progress)
            outcome = "ok"
        except (asyncio.CancelledError, GenerationCancelled):
            outcome = "cancelled"  # not the denoiser's fault: not reported to the router
            raise
        except VidgenError as exc:
            if exc.code == "style_unavailable":
                outcome = "style_unavailable"  # the adapter file, not the denoiser: no failover breach
            raise
        finally:
            if outcome not in ("cancelled", "style_unavailable"):
                self._report(target, time.perf_counter() - t0, plan, outcome == "ok")
        return final["latents"], final["timings"], target

    async def _read_stream(self, stage: str, gen: Any, on_progress: ProgressCallback | None) -> dict[str, Any]:
        """Read a stage's stream: pass its {"progress": ...} items to `on_progress`, return its final item.

        A failure becomes the stage's `VidgenError` (`map_stage_error`); a stream left unfinished
        (failure, cancellation, no final item) is cancelled, which stops the replica's work at its
        next boundary (a denoise step, ffmpeg) instead of finishing what nobody will receive.
        """
        final = None
        try:
            async for item in gen:
                if "progress" in item:
                    if on_progress is not None:
                        await on_progress(item["progress"])
                else:
                    final = item
        except (asyncio.CancelledError, GenerationCancelled):
            raise
        except Exception as exc:  # noqa: BLE001
            raise map_stage_error(stage, exc, self.retry_after_s) from exc
        finally:
            if final is None:
                gen.cancel()
        if final is None:
            raise VidgenError(500, f"the {stage} stage returned no result", code="stage_error")
        return final

    async def generate(self, plan: GenerationPlan, *, artifact_key: str | None = None,
                       on_stage: StageCallback | None = None,
                       on_progress: ProgressCallback | None = None) -> GenerationResult:
        """Run text encoder -> denoiser -> decoder.

        Args:
            plan: the validated plan.
            artifact_key: store the MP4 under this key in the artifact store (the Decoder
                writes it) instead of returning its bytes.
            on_stage: awaited with "text_encode" / "denoise" / "decode" as each stage starts.
            on_progress: awaited with each progress event (the denoiser's per (step, window)
                unit, then the decoder's per phase); may raise to stop.
        """
        t0 = time.perf_counter()
        with tracer().start_as_current_span("generate", attributes=plan.summary() | {"windows": len(plan.windows)}):
            carrier = carrier_for_current_span()
            # The router is asked which denoiser to use while the text is encoded (one round trip
            # fewer on the request's path); its answer cannot fail (it falls back to the primary).
            choice = asyncio.ensure_future(self._choose_denoiser())
            try:
                if on_stage:
                    await on_stage("text_encode")
                embeddings, timings = await self._call("text_encode",
                                                       self.text_encoder.encode.remote(plan, carrier))
                if on_stage:
                    await on_stage("denoise")
            except BaseException:
                choice.cancel()
                raise
            latents, denoise_timings, target = await self.denoise(plan, embeddings, carrier, on_progress, choice)
            timings.update(denoise_timings)
            if on_stage:
                await on_stage("decode")
            mp4, decode_timings, quality = await self._decode(plan, latents, carrier, artifact_key, on_progress)
            timings.update(decode_timings)
        timings["total"] = time.perf_counter() - t0
        self.stage_shares.observe(timings)
        return GenerationResult(timings=timings, denoiser=target,
                                text_cache="hit" if embeddings.cache_misses == 0 else "miss",
                                mp4=mp4, artifact=artifact_key, quality=quality)

    async def _decode(self, plan: GenerationPlan, latents: Any, carrier: dict, artifact_key: str | None,
                      on_progress: ProgressCallback | None) -> tuple[bytes | None, dict[str, float], dict[str, float]]:
        """Decode to bytes (or into the artifact store under `artifact_key`), passing the
        Decoder's phase progress on. Returns (bytes or None, timings, quality metrics)."""
        decoder = self.decoder.options(stream=True)
        if artifact_key is None:
            gen = decoder.decode.remote(plan, latents, carrier, on_progress is not None)
        else:
            gen = decoder.decode_to_store.remote(plan, latents, artifact_key, carrier, on_progress is not None)
        final = await self._read_stream("decode", gen, on_progress)
        mp4, timings, quality = final.get("mp4"), final["timings"], final.get("quality") or {}
        if artifact_key is None and mp4 is None:
            raise VidgenError(500, "the decode stage returned no video", code="stage_error")
        return mp4, timings, quality
