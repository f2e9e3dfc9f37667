"""Stage 2: flow-matching denoising with classifier-free guidance over sliding windows.

Long videos are denoised as overlapping windows of the model's native length. At every
step each window predicts the noise of its own frames, the predictions are blended in
latent space with weights that ramp across the overlaps, and one scheduler step moves
the whole latent video. All windows share one noise tensor, so overlapping frames
start from the same noise and seams stay continuous.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..config import AppConfig
from ..errors import GenerationCancelled
from ..models.loading import device_for, load_scheduler, load_transformer, resolve_checkpoint
from ..plan import GenerationPlan, Window
from .text_encoder import PromptEmbeddings

ProgressCallback = Callable[[dict[str, int]], None]
CancelCheck = Callable[[], bool]


def initial_noise(plan: GenerationPlan, channels: int) -> torch.Tensor:
    """The seeded initial latents for the whole video (CPU generator: same on every device)."""
    generator = torch.Generator("cpu").manual_seed(plan.seed)
    shape = (1, channels, plan.latent_frames, plan.latent_height, plan.latent_width)
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def window_weights(windows: list[Window], overlap: int) -> list[torch.Tensor]:
    """Per-latent-frame blend weights of each window: 1 inside, ramping across overlaps."""
    weights = []
    for k, win in enumerate(windows):
        w = torch.ones(win.length)
        ramp = torch.arange(1, overlap + 1, dtype=torch.float32) / (overlap + 1)
        if k > 0:
            w[:overlap] = torch.minimum(w[:overlap], ramp)
        if k < len(windows) - 1:
            w[-overlap:] = torch.minimum(w[-overlap:], ramp.flip(0))
        weights.append(w)
    return weights


class Denoiser:
    """Wan transformer + flow-matching scheduler.

    Args:
        config: application config.
        checkpoint: checkpoint path; default resolves the profile's.
        transformer: an already prepared transformer (e.g. a tensor-parallel shard);
            default loads the checkpoint's onto the profile's device.
        device: device of `transformer` when given.
    """

    def __init__(
        self,
        config: AppConfig,
        checkpoint: str | None = None,
        transformer: Any = None,
        device: torch.device | None = None,
    ):
        self.profile = config.model_profile
        checkpoint = checkpoint or resolve_checkpoint(config)
        if transformer is None:
            device = device_for(self.profile)
            transformer = load_transformer(checkpoint, self.profile, device)
        self.device = device or torch.device("cpu")
        self.transformer = transformer
        self.scheduler_template = load_scheduler(checkpoint)
        self.in_channels = transformer.config.in_channels
        self.dtype = next(transformer.parameters()).dtype

    def _predict(
        self, latents: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None, scale: float
    ) -> torch.Tensor:
        """Noise prediction with classifier-free guidance (cond and uncond in one batch)."""
        x = latents.to(self.dtype)
        if uncond is None:
            return self.transformer(
                hidden_states=x, timestep=t.expand(1), encoder_hidden_states=cond, return_dict=False
            )[0].float()
        out = self.transformer(
            hidden_states=torch.cat([x, x]),
            timestep=t.expand(2),
            encoder_hidden_states=torch.cat([cond, uncond]),
            return_dict=False,
        )[0].float()
        noise_cond, noise_uncond = out.chunk(2)
        return noise_uncond + scale * (noise_cond - noise_uncond)

    @torch.inference_mode()
    def denoise(
        self,
        plan: GenerationPlan,
        embeddings: PromptEmbeddings,
        progress: ProgressCallback | None = None,
        should_cancel: CancelCheck | None = None,
    ) -> torch.Tensor:
        """Run the sampling loop.

        Args:
            plan: the generation plan (sizes, windows, steps, seed, guidance).
            embeddings: from `TextEncoder.encode`.
            progress: called after each window's step with
                {"step", "steps", "window", "windows"} (1-based).
            should_cancel: checked at every step boundary; True raises `GenerationCancelled`.

        Returns:
            Latents (1, C, latent_frames, latent_height, latent_width), float32 on CPU.
        """
        # 1. Conditioning on the transformer's device and dtype
        conds = embeddings.prompt_embeds.to(self.device, self.dtype)
        uncond = None
        if embeddings.negative_prompt_embeds is not None and plan.guidance_scale > 1.0:
            uncond = embeddings.negative_prompt_embeds.to(self.device, self.dtype)

        # 2. Timesteps (a fresh scheduler per call: schedulers keep per-run state)
        scheduler = self.scheduler_template.__class__.from_config(self.scheduler_template.config)
        scheduler.set_timesteps(plan.num_inference_steps, device=self.device)
        scheduler.set_begin_index(0)

        # 3. Initial latents for the whole video
        latents = initial_noise(plan, self.in_channels).to(self.device)
        weights = [w.to(self.device).view(1, 1, -1, 1, 1) for w in window_weights(plan.windows, plan.overlap_latent_frames)]
        n_windows = len(plan.windows)

        # 4. Denoising loop: every window predicts, predictions blend, one step for all
        for i, t in enumerate(scheduler.timesteps):
            if should_cancel is not None and should_cancel():
                raise GenerationCancelled(f"cancelled at step {i + 1}/{plan.num_inference_steps}")
            if n_windows == 1:
                win = plan.windows[0]
                noise_pred = self._predict(latents, t, conds[win.prompt_index : win.prompt_index + 1], uncond,
                                           plan.guidance_scale)
                if progress is not None:
                    progress({"step": i + 1, "steps": plan.num_inference_steps, "window": 1, "windows": 1})
            else:
                noise_pred = torch.zeros_like(latents)
                weight_sum = torch.zeros((1, 1, plan.latent_frames, 1, 1), device=self.device)
                for k, (win, w) in enumerate(zip(plan.windows, weights)):
                    cond = conds[win.prompt_index : win.prompt_index + 1]
                    pred = self._predict(latents[:, :, win.start : win.end], t, cond, uncond, plan.guidance_scale)
                    noise_pred[:, :, win.start : win.end] += pred * w
                    weight_sum[:, :, win.start : win.end] += w
                    if progress is not None:
                        progress({"step": i + 1, "steps": plan.num_inference_steps, "window": k + 1,
                                  "windows": n_windows})
                noise_pred = noise_pred / weight_sum
            latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]

        return latents.float().cpu()
