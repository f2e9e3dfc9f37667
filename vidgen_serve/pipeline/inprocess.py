"""The in-process pipeline: the three stages composed in one process (CLI, benchmarks).

What is served is exactly this: the Ray Serve deployments wrap the same stage classes.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import AppConfig
from ..models.loading import resolve_checkpoint
from ..plan import GenerationPlan, build_plan
from ..request import VideoRequest
from .decoder import Decoder
from .denoiser import CancelCheck, Denoiser, ProgressCallback
from .text_encoder import TextEncoder


@dataclass
class GenerationResult:
    """Where the video went, the plan that made it, seconds per stage, and the video's quality
    metrics (`media.quality`: temporal SSIM, temporal PSNR, flicker score)."""

    path: Path
    plan: GenerationPlan
    timings: dict[str, float] = field(default_factory=dict)
    quality: dict[str, float] = field(default_factory=dict)


class VideoPipeline:
    """TextEncoder -> Denoiser -> Decoder in one process.

    Args:
        config: application config.
        denoiser: a prepared denoiser (e.g. a tensor-parallel group's front); default
            builds a local one.
    """

    def __init__(self, config: AppConfig, denoiser=None):
        self.config = config
        checkpoint = resolve_checkpoint(config)
        self.text_encoder = TextEncoder(config, checkpoint)
        self.denoiser = denoiser or Denoiser(config, checkpoint)
        self.decoder = Decoder(config, checkpoint)

    def plan(self, request: VideoRequest, seed: int | None = None) -> GenerationPlan:
        return build_plan(request, self.config, seed=seed)

    def generate(
        self,
        request: VideoRequest | GenerationPlan,
        output_path: str | os.PathLike,
        progress: ProgressCallback | None = None,
        should_cancel: CancelCheck | None = None,
    ) -> GenerationResult:
        """Generate one video into `output_path`.

        Args:
            request: a request (planned here) or an already computed plan.
            output_path: where the MP4 goes (written atomically).
            progress: per-step callback, see `Denoiser.denoise`.
            should_cancel: checked at every denoising step boundary.
        """
        plan = request if isinstance(request, GenerationPlan) else self.plan(request)
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        embeddings = self.text_encoder.encode(plan)
        t1 = time.perf_counter()
        latents = self.denoiser.denoise(plan, embeddings, progress=progress, should_cancel=should_cancel)
        t2 = time.perf_counter()
        timings.update(text_encode=t1 - t0, denoise=t2 - t1)
        decoded = self.decoder.decode(plan, latents, output_path)
        timings.update(decoded.timings)
        timings["total"] = time.perf_counter() - t0
        return GenerationResult(Path(output_path), plan, timings, decoded.quality)
