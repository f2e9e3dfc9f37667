"""Stage 2: flow-matching denoising with classifier-free guidance over sliding windows.

Long videos are denoised as overlapping windows of the model's native length. At every
step each window predicts the noise of its own frames, the predictions are blended in
latent space with weights that ramp across the overlaps, and one scheduler step moves
the whole latent video. All windows share one noise tensor, so overlapping frames
start from the same noise and seams stay continuous. With the profile's
`window_schedule: shifted`, each step's windows tile the video with a small overlap instead,
and the tiling alternates between two whose boundaries are half a window apart.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Callable, Iterator

import torch

from ..config import AppConfig
from ..errors import GenerationCancelled
from ..models.loading import device_for, load_scheduler, load_transformer, resolve_checkpoint
from ..plan import GenerationPlan, Window
from .controls import DEFAULT_CONSISTENCY, correlate_frames, seam_ramp
from .styles import DEFAULT_MAX_STYLES, StyleAdapters
from .text_encoder import PromptEmbeddings

ProgressCallback = Callable[[dict[str, int]], None]
CancelCheck = Callable[[], bool]
logger = logging.getLogger(__name__)


def set_attention_backend(transformer: Any, backend: str) -> None:
    """Route the transformer's attention through diffusers' dispatcher backend `backend`.

    diffusers also makes the backend the process-wide default for every other model; that is
    put back, so only this transformer's attention changes.
    """
    if backend == "native":
        return
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    previous = _AttentionBackendRegistry._active_backend
    transformer.set_attention_backend(backend)
    _AttentionBackendRegistry.set_active_backend(previous)


def initial_noise(plan: GenerationPlan, channels: int) -> torch.Tensor:
    """The seeded initial latents for the whole video (CPU generator: same on every device).

    Frames share a noise component that grows as `plan.motion_intensity` falls (see `controls`).
    """
    generator = torch.Generator("cpu").manual_seed(plan.seed)
    shape = (1, channels, plan.latent_frames, plan.latent_height, plan.latent_width)
    eps = torch.randn(shape, generator=generator, dtype=torch.float32)
    return correlate_frames(eps, plan.motion_intensity, generator)


def window_weights(windows: list[Window], overlap: int,
                   temporal_consistency: float = DEFAULT_CONSISTENCY) -> list[torch.Tensor]:
    """Per-latent-frame blend weights of each window: 1 inside, ramping across overlaps (`seam_ramp`)."""
    weights = []
    ramp = seam_ramp(overlap, temporal_consistency)
    for k, win in enumerate(windows):
        w = torch.ones(win.length)
        if k > 0:
            w[:overlap] = torch.minimum(w[:overlap], ramp)
        if k < len(windows) - 1:
            w[-overlap:] = torch.minimum(w[-overlap:], ramp.flip(0))
        weights.append(w)
    return weights


def window_condition(conds: torch.Tensor, weights: list[tuple[int, float]]) -> torch.Tensor:
    """The text conditioning (1, S, D) of a window under prompts `weights` [(row of `conds`, weight)].

    One prompt: its row as is (no arithmetic, so a single-prompt video is exactly the plain path).
    Several (a window across a keyframe): the weighted sum of their embeddings, in float32.
    """
    if len(weights) == 1:
        index = weights[0][0]
        return conds[index : index + 1]
    mixed = sum(weight * conds[index : index + 1].float() for index, weight in weights)
    return mixed.to(conds.dtype)


class Denoiser:
    """Wan transformer + flow-matching scheduler.

    Args:
        config: application config.
        checkpoint: checkpoint path; default resolves the profile's.
        transformer: an already prepared transformer (e.g. a tensor-parallel shard);
            default loads the checkpoint's onto the profile's device.
        device: device of `transformer` when given.
        max_styles: style LoRA adapters kept loaded (least recently used unloaded first).
    """

    def __init__(
        self,
        config: AppConfig,
        checkpoint: str | None = None,
        transformer: Any = None,
        device: torch.device | None = None,
        max_styles: int = DEFAULT_MAX_STYLES,
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
        # The compute dtype as diffusers' WanPipeline reads it (`transformer.dtype` skips the
        # `_keep_in_fp32_modules`, e.g. `scale_shift_table`, which stay float32 in a bf16 model).
        self.dtype = transformer.dtype
        self._cache_owner: Any = None  # the run whose step-cache hooks are on the transformer
        self.styles = StyleAdapters(config, transformer, max_styles)  # style LoRAs (pipeline/styles.py)
        set_attention_backend(transformer, self.profile.attention_backend)
        self.warm_up_seconds = 0.0
        if self.profile.compile:
            # Regional compilation: each repeated block compiled once, reused by all 30/40 of them.
            transformer.compile_repeated_blocks(fullgraph=True, backend=self.profile.compile_backend)
            self.warm_up_seconds = self.warm_up()

    def warm_up(self) -> float:
        """Run the transformer at the shapes requests use, so compilation happens now and never in a request.

        Three calls: a full window with CFG (the common shape, compiled static), a shorter window
        (the sequence length becomes dynamic: every other size and aspect reuses that graph), and a
        full window without CFG (batch 1 is specialised). Returns the seconds it took.
        """
        t0 = time.perf_counter()
        profile, cfg = self.profile, self.transformer.config
        width, height = next(iter(profile.native_sizes.values()))
        window = (profile.max_window_frames - 1) // 4 + 1
        scheduler = self.scheduler_template.__class__.from_config(self.scheduler_template.config)
        scheduler.set_timesteps(2, device=self.device)  # a timestep of the dtype requests use
        t = scheduler.timesteps[0]
        cond = torch.zeros(1, profile.max_sequence_length, cfg.text_dim, device=self.device, dtype=self.dtype)
        with torch.inference_mode():
            for name, frames, uncond in (("full window, CFG", window, cond),
                                         ("shorter window (dynamic length)", max(1, window // 2), cond),
                                         ("full window, no CFG", window, None)):
                t1 = time.perf_counter()
                latents = torch.zeros(1, self.in_channels, frames, height // 8, width // 8, device=self.device)
                self._predict(latents, t, cond, uncond, 5.0)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                logger.info("denoiser warm-up: %s (%d latent frames) compiled and ran in %.1fs", name, frames,
                            time.perf_counter() - t1)
        seconds = time.perf_counter() - t0
        logger.info("denoiser warm-up (compile) took %.1fs", seconds)
        return seconds

    def _step_cache_config(self, mode: str) -> Any:
        from diffusers import FirstBlockCacheConfig, TaylorSeerCacheConfig

        if mode == "first_block":
            return FirstBlockCacheConfig(threshold=self.profile.step_cache_threshold)
        if mode == "taylorseer":
            # Lite mode: on predicted steps the blocks are skipped and only the output projection is
            # extrapolated (per-block Taylor factors of a 1.3B model at 480p would take tens of GiB).
            return TaylorSeerCacheConfig(use_lite_mode=True, taylor_factors_dtype=torch.float32)
        raise ValueError(f"step_cache={mode!r}; valid: off, first_block, taylorseer")

    @contextlib.contextmanager
    def step_cache(self, run: "DenoiseRun", window: int | str) -> Iterator[None]:
        """The transformer as `run` wants it for one window's call: with its step-cache hooks, or plain.

        Hooks are diffusers' cache hooks (`enable_cache`), put on for the run that uses them and
        taken off when another run (or a plain one) takes the transformer, so a run with
        step_cache 'off' runs exactly the plain transformer. Each window keeps its own cache state
        (`cache_context`). A compiled transformer runs cached calls eagerly: the hooks' data-dependent
        skips would otherwise recompile inside a request.
        """
        transformer = self.transformer
        if self._cache_owner is not run:
            if getattr(transformer, "is_cache_enabled", False):
                transformer.disable_cache()
            if run.plan.step_cache != "off":
                transformer.enable_cache(self._step_cache_config(run.plan.step_cache))
            self._cache_owner = run
        if run.plan.step_cache == "off":
            yield
            return
        stance = torch.compiler.set_stance("force_eager") if self.profile.compile else contextlib.nullcontext()
        with stance, transformer.cache_context(f"window-{window}"):
            yield

    def release_step_cache(self, run: "DenoiseRun") -> None:
        """Take `run`'s cache hooks (and their state) off the transformer, if it holds them."""
        if self._cache_owner is run:
            if getattr(self.transformer, "is_cache_enabled", False):
                self.transformer.disable_cache()
            self._cache_owner = None

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

    def start(self, plan: GenerationPlan, embeddings: PromptEmbeddings) -> "DenoiseRun":
        """A step-by-step run: the serving layer streams progress and honours cancellation between steps.

        Loads the style's LoRA adapter first if it has one (`StyleUnavailable` if it can't be read).
        """
        self.styles.activate(plan.style)
        return DenoiseRun(self, plan, embeddings)

    def load_style(self, style: str) -> bool:
        """Load `style`'s LoRA adapter (LRU); True if it was read now, False if already loaded or plain."""
        return self.styles.load(style)

    def unload_style(self, style: str) -> bool:
        """Unload `style`'s LoRA adapter; True if it was loaded."""
        return self.styles.unload(style)

    def style_stats(self) -> dict[str, Any]:
        """Which style adapters are loaded (least recent first), load counts, evictions."""
        return self.styles.stats()

    def denoise(
        self,
        plan: GenerationPlan,
        embeddings: PromptEmbeddings,
        progress: ProgressCallback | None = None,
        should_cancel: CancelCheck | None = None,
    ) -> torch.Tensor:
        """Run the whole sampling loop.

        Args:
            plan: the generation plan (sizes, windows, steps, seed, guidance).
            embeddings: from `TextEncoder.encode`.
            progress: called after each window's step with
                {"step", "steps", "window", "windows"} (1-based).
            should_cancel: checked at every step boundary; True raises `GenerationCancelled`.

        Returns:
            Latents (1, C, latent_frames, latent_height, latent_width), float32 on CPU.
        """
        return drive(self.start(plan, embeddings), progress, should_cancel)


def drive(run: Any, progress: ProgressCallback | None = None, should_cancel: CancelCheck | None = None) -> torch.Tensor:
    """Advance a run (local or tensor-parallel) to the end; return its latents.

    Checks `should_cancel` at every step boundary and releases the run's resources
    (`run.release()`, where it has one) however it ends.
    """
    try:
        while not run.done:
            if should_cancel is not None and should_cancel():
                raise GenerationCancelled(f"cancelled at step {run.step + 1}/{run.plan.num_inference_steps}")
            event = run.advance()
            if progress is not None:
                progress(event)
        return run.latents()
    finally:
        release = getattr(run, "release", None)
        if release is not None:
            release()


class DenoiseRun:
    """One sampling loop, advanced one (step, window) unit at a time.

    Every step, each window predicts the noise of its frames; after the last window the
    blended prediction moves the whole latent video by one scheduler step.
    """

    @torch.inference_mode()
    def __init__(self, denoiser: Denoiser, plan: GenerationPlan, embeddings: PromptEmbeddings):
        self.denoiser = denoiser
        self.plan = plan
        device, dtype = denoiser.device, denoiser.dtype
        # 1. Conditioning on the transformer's device and dtype
        self.conds = embeddings.prompt_embeds.to(device, dtype)
        self.uncond = None
        if embeddings.negative_prompt_embeds is not None and plan.guidance_scale > 1.0:
            self.uncond = embeddings.negative_prompt_embeds.to(device, dtype)
        # The steps' window lists: one ('overlap'), or two alternating tilings ('shifted')
        self.partitions = plan.tilings
        # Each window's conditioning: its prompt's row, or across a keyframe the weighted sum of its prompts' rows
        self.partition_conds = [[window_condition(self.conds, win.prompt_weights) for win in part]
                                for part in self.partitions]
        # 2. Timesteps (a fresh scheduler per run: schedulers keep per-run state)
        template = denoiser.scheduler_template
        self.scheduler = template.__class__.from_config(template.config)
        self.scheduler.set_timesteps(plan.num_inference_steps, device=device)
        self.scheduler.set_begin_index(0)
        self.timesteps = self.scheduler.timesteps
        # 3. Initial latents for the whole video, and each partition's windows' blend weights
        self._latents = initial_noise(plan, denoiser.in_channels).to(device)
        self.partition_weights = [
            [w.to(device).view(1, 1, -1, 1, 1)
             for w in window_weights(part, plan.overlap_latent_frames, plan.temporal_consistency)]
            for part in self.partitions
        ]
        self.step = 0  # steps completed
        self.window = 0  # windows of the current step completed
        self._noise_pred = torch.zeros_like(self._latents)
        self._weight_sum = torch.zeros((1, 1, plan.latent_frames, 1, 1), device=device)

    @property
    def done(self) -> bool:
        return self.step >= len(self.timesteps)

    @torch.inference_mode()
    def advance(self) -> dict[str, int]:
        """Predict the next window of the current step; finish the step after the last window.

        Returns:
            Progress {"step", "steps", "window", "windows"} (1-based) of the unit just done.
        """
        # 4. One window of one denoising step
        plan, t = self.plan, self.timesteps[self.step]
        part = self.step % len(self.partitions)
        windows = self.partitions[part]
        win, cond = windows[self.window], self.partition_conds[part][self.window]
        self.denoiser.styles.activate(plan.style)  # a no-op unless another run switched or evicted it
        # Cache state per window (a shifted schedule's windows recur every other step)
        cache_key = self.window if part == 0 else f"shifted-{self.window}"
        with self.denoiser.step_cache(self, cache_key):
            pred = self.denoiser._predict(self._latents[:, :, win.start : win.end], t, cond, self.uncond,
                                          plan.guidance_scale)
        event = {"step": self.step + 1, "steps": len(self.timesteps), "window": self.window + 1,
                 "windows": len(windows)}
        if len(windows) == 1:
            noise_pred = pred
        else:
            w = self.partition_weights[part][self.window]
            self._noise_pred[:, :, win.start : win.end] += pred * w
            self._weight_sum[:, :, win.start : win.end] += w
            noise_pred = None
        self.window += 1
        if self.window == len(windows):
            # 5. Blend the windows' predictions and step the whole latent video
            if noise_pred is None:
                noise_pred = self._noise_pred / self._weight_sum
                self._noise_pred.zero_()
                self._weight_sum.zero_()
            self._latents = self.scheduler.step(noise_pred, t, self._latents, return_dict=False)[0]
            self.step += 1
            self.window = 0
            if self.done:
                self.release()
        return event

    def release(self) -> None:
        """Free what the run holds on the shared transformer (its step-cache hooks); idempotent."""
        self.denoiser.release_step_cache(self)

    def latents(self) -> torch.Tensor:
        """The final latents (float32, CPU); only valid once `done`."""
        if not self.done:
            raise RuntimeError(f"denoising not finished: {self.step}/{len(self.timesteps)} steps")
        return self._latents.float().cpu()
