"""Stage 3: VAE decode -> frames -> frame-rate conversion + upscale -> MP4.

Where it runs: the VAE needs a GPU for real models (1.3B at 480p: 2 s in bf16 on an H100), but
post-processing is CPU work (motion interpolation in parallel chunks, lanczos, x264), so a
Decoder replica wants many CPU cores next to its GPU, or a GPU with an NVENC engine (L4, L40S)
where H.264 is encoded in hardware. A100/H100 have no NVENC: there x264 uses the replica's CPUs.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..config import AppConfig
from ..errors import VidgenError
from ..media.controls import color_temperature, deflicker_size
from ..media.mp4 import EncodeSettings, encode_mp4, select_h264_encoder
from ..media.quality import quality_metrics
from ..models.loading import device_for, load_vae, resolve_checkpoint
from ..plan import GenerationPlan


@dataclass
class DecodeResult:
    """What `Decoder.decode` measured: seconds per step, and the video's quality metrics
    (`media.quality.quality_metrics` of the frames handed to the encoder)."""

    timings: dict[str, float]
    quality: dict[str, float] = field(default_factory=dict)


class Decoder:
    """Wan VAE decoder plus post-processing and MP4 encoding.

    Args:
        config: application config.
        checkpoint: checkpoint path; default resolves the profile's.
    """

    def __init__(self, config: AppConfig, checkpoint: str | None = None):
        from diffusers.video_processor import VideoProcessor

        self.profile = config.model_profile
        checkpoint = checkpoint or resolve_checkpoint(config)
        self.device = device_for(self.profile)
        try:
            self.video_encoder = select_h264_encoder(self.profile.video_encoder)  # probed once, before loading
        except ValueError as exc:
            raise VidgenError(422, f"profile {self.profile.name!r}: {exc}", code="invalid_profile") from None
        self.vae = load_vae(checkpoint, self.profile, self.device)
        if self.profile.vae_tiling:
            tile = self.profile.vae_tile_px
            self.vae.enable_tiling(tile_sample_min_height=tile, tile_sample_min_width=tile,
                                   tile_sample_stride_height=tile * 3 // 4, tile_sample_stride_width=tile * 3 // 4)
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae.config.scale_factor_spatial)
        cfg = self.vae.config
        self._latents_mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1)
        self._latents_std = torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1)
        # The Wan VAE keeps its causal feature cache on the module (`_feat_map`), so two
        # decodes at once in one replica would overwrite each other's cache: one at a time.
        self._vae_lock = threading.Lock()

    @torch.inference_mode()
    def decode_latents(self, plan: GenerationPlan, latents: torch.Tensor,
                       progress: Callable[[float], None] | None = None) -> np.ndarray:
        """Latents -> native frames (num_frames, H, W, 3) uint8, as `WanPipeline` decodes them.

        `progress`, if given, is called with the fraction of latent frames decoded (0..1).
        """
        expected = (plan.latent_frames, plan.latent_height, plan.latent_width)
        if tuple(latents.shape[2:]) != expected:
            raise ValueError(f"latents shape {tuple(latents.shape)} does not match the plan's {expected}")
        dtype = self.vae.dtype
        latents = latents.to(self.device, dtype)
        latents = latents * self._latents_std.to(latents) + self._latents_mean.to(latents)
        with self._vae_lock:
            hook = None
            if progress is not None:
                # The Wan VAE runs its decoder once per latent frame (causal, frame by frame).
                done = [0]

                def frame_decoded(*_args) -> None:
                    done[0] += 1
                    progress(min(1.0, done[0] / plan.latent_frames))

                hook = self.vae.decoder.register_forward_hook(frame_decoded)
            try:
                # On CPU, oneDNN JIT-compiles conv3d kernels per input shape, and the VAE's causal
                # cache feeds it many shapes: the native kernels are ~10x faster here.
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)  # flags() warns about TF32 on Intel GPUs
                    with torch.backends.mkldnn.flags(enabled=self.device.type != "cpu"):
                        video = self.vae.decode(latents, return_dict=False)[0]
            finally:
                if hook is not None:
                    hook.remove()
        # Post-processing in float32 (numpy has no bfloat16).
        frames = self.video_processor.postprocess_video(video.float(), output_type="np")[0]  # (F, H, W, 3) in [0, 1]
        return np.round(frames * 255.0).clip(0, 255).astype(np.uint8)

    def encode_settings(self, plan: GenerationPlan) -> EncodeSettings:
        return EncodeSettings(
            in_fps=plan.native_fps,
            out_fps=plan.output_fps,
            out_width=plan.output_width,
            out_height=plan.output_height,
            out_frames=plan.output_num_frames,
            preset=self.profile.x264_preset,
            crf=self.profile.x264_crf,
            interpolation=self.profile.interpolation,
            threads=self.profile.decoder_threads or 0,
            encoder=self.video_encoder,
            camera_motion=plan.camera_motion,
            color_temperature=color_temperature(plan.color_palette),
            deflicker_size=deflicker_size(plan.temporal_consistency),
        )

    def write_mp4(self, plan: GenerationPlan, frames: np.ndarray, output_path: str | os.PathLike,
                  cancel: threading.Event | None = None) -> Path:
        """Frame-rate conversion, camera move, grade, upscale and H.264 encode of native frames into `output_path`."""
        return encode_mp4(frames, self.encode_settings(plan), output_path, cancel)

    def decode(self, plan: GenerationPlan, latents: torch.Tensor, output_path: str | os.PathLike,
               cancel: threading.Event | None = None,
               progress: Callable[[dict], None] | None = None) -> DecodeResult:
        """Latents -> MP4 at `output_path`. Returns per-step seconds {"vae_decode", "quality_metrics",
        "encode"} and the video's quality metrics.

        The metrics are computed on the frames handed to the encoder: native resolution and
        frame rate, before ffmpeg's frame-rate conversion and upscale (interpolated and
        resampled frames would measure the interpolation, and cost up to 10x more pixels).

        Args:
            cancel: when set, stops the encode (raises `GenerationCancelled`).
            progress: called with {"phase": "vae_decode" | "encode", "fraction": 0..1} as
                the phases advance (per latent frame while VAE decoding; at the start and
                the end of the encode).
        """
        def report(phase: str, fraction: float) -> None:
            if progress is not None:
                progress({"phase": phase, "fraction": round(fraction, 4)})

        t0 = time.perf_counter()
        report("vae_decode", 0.0)
        frames = self.decode_latents(plan, latents, progress=lambda f: report("vae_decode", f))
        t1 = time.perf_counter()
        quality = quality_metrics(frames, self.device)
        t2 = time.perf_counter()
        report("encode", 0.0)
        self.write_mp4(plan, frames, output_path, cancel)
        report("encode", 1.0)
        timings = {"vae_decode": t1 - t0, "quality_metrics": t2 - t1, "encode": time.perf_counter() - t2}
        return DecodeResult(timings, quality)
