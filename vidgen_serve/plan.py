"""GenerationPlan: a validated request turned into every size, count and seed, once.

Every stage reads its sizes from the plan; nobody recomputes them. The plan is a plain
pydantic model so it crosses Ray's object store and can be stored with a job.

Wan 2.1 facts the arithmetic follows: the VAE compresses 4x in time (a video of F pixel
frames has (F - 1) / 4 + 1 latent frames, so F must be 4k+1) and 8x in space; the
transformer patchifies latents 2x2, so pixel sizes are multiples of 16.
"""

from __future__ import annotations

import math
import secrets
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .config import AppConfig, ModelProfile, output_size
from .errors import InvalidRequest, field_error
from .prompting import build_schedule, window_prompt_weights
from .request import Keyframe, VideoRequest, duration_limit

VAE_TEMPORAL = 4
VAE_SPATIAL = 8
PATCH_SPATIAL = 2


class Window(BaseModel):
    """A sliding window over latent frames [start, end)."""

    model_config = ConfigDict(frozen=True)

    start: int
    end: int
    prompt_index: int = 0  # the dominant one of `prompt_weights` (the only one for a single prompt)
    prompt_weights: list[tuple[int, float]] = Field(
        default_factory=list,
        description="(index into plan.prompts, weight): the window is conditioned on the weighted sum of these "
        "prompts' embeddings, by the share of its frames under each; default [(prompt_index, 1.0)].",
    )

    @model_validator(mode="before")
    @classmethod
    def _default_weights(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("prompt_weights"):
            data = {**data, "prompt_weights": [(data.get("prompt_index", 0), 1.0)]}
        return data

    @property
    def length(self) -> int:
        return self.end - self.start


class GenerationPlan(BaseModel):
    """Everything the stages need to know about one generation."""

    model_config = ConfigDict(frozen=True)

    # Text
    prompts: list[str] = Field(description="Distinct positive prompts (style template + control descriptors); "
                               "[0] is in force from t=0, keyframes' follow (see windows' prompt_weights).")
    negative_prompt: str = Field(description="Negative prompt: the user's, the prompt's negative phrases, the style's.")
    style: str
    style_lora: bool = Field(False, description="The style carries a LoRA adapter (routed by Serve multiplexing).")
    # Sampler
    seed: int
    num_inference_steps: int
    guidance_scale: float
    step_cache: str = Field("off", description="Denoiser step caching for this run ('off' = the plain path).")
    # Native (model) geometry
    native_width: int
    native_height: int
    native_fps: int
    num_frames: int = Field(description="Native pixel frames (4k+1).")
    latent_frames: int
    latent_height: int
    latent_width: int
    windows: list[Window]
    overlap_latent_frames: int
    shifted_windows: list[Window] = Field(
        default_factory=list,
        description="The 'shifted' schedule's odd steps' tiling, boundaries half a window from `windows`' (even "
        "steps); empty: every step runs `windows`.")
    # Output
    duration_s: float
    output_width: int
    output_height: int
    output_fps: int
    output_num_frames: int
    # Creative controls, validated and carried for the stages that apply them
    motion_intensity: float
    color_palette: str
    camera_motion: str
    temporal_consistency: float
    keyframes: list[Keyframe] = Field(
        default_factory=list,
        description="The prompt schedule: the request's keyframes and the prompt's time directives, in time order.",
    )
    prompt_warnings: list[str] = Field(default_factory=list, description="What the prompt parser could not use.")

    @property
    def window_schedule(self) -> Literal["overlap", "shifted"]:
        """'shifted' when the steps alternate between two tilings (`shifted_windows`), else 'overlap'."""
        return "shifted" if self.shifted_windows else "overlap"

    @property
    def tilings(self) -> list[list[Window]]:
        """The window lists the steps cycle through: `[windows]`, or `[windows, shifted_windows]`."""
        return [self.windows, self.shifted_windows] if self.shifted_windows else [self.windows]

    def windows_at(self, step: int) -> list[Window]:
        """The windows denoising step `step` (0-based) runs."""
        tilings = self.tilings
        return tilings[step % len(tilings)]

    @property
    def window_units(self) -> int:
        """(step, window) units of the whole run: progress reports count these."""
        return sum(len(self.windows_at(step)) for step in range(self.num_inference_steps))

    @property
    def window_tokens(self) -> int:
        """Transformer tokens processed per denoising step, summed over windows."""
        per_frame = (self.latent_height // PATCH_SPATIAL) * (self.latent_width // PATCH_SPATIAL)
        return sum(w.length for w in self.windows) * per_frame

    @property
    def classifier_free_guidance(self) -> bool:
        """Whether guidance runs an unconditional pass too (guidance_scale 1 means it does not)."""
        return self.guidance_scale > 1.0

    @property
    def work_units(self) -> float:
        """The denoising work of this plan, in transformer token-passes.

        One unit is one latent token going through the transformer once: steps x tokens per
        step (all windows) x forward passes per step (2 with classifier-free guidance, 1
        without). The failover router normalises latency by it, so a long 1080p request is
        not "slow" next to a short one, nor a guidance-free one "fast". Attention is
        super-linear in tokens, so this is a first-order measure.
        """
        passes = 2 if self.classifier_free_guidance else 1
        return float(self.num_inference_steps * self.window_tokens * passes)

    def summary(self) -> dict[str, Any]:
        """A short, loggable description (no prompt text)."""
        return {
            "native": f"{self.native_width}x{self.native_height}@{self.native_fps}",
            "frames": self.num_frames,
            "latent": [self.latent_frames, self.latent_height, self.latent_width],
            "windows": [(w.start, w.end) for w in self.windows],
            **({"shifted_windows": [(w.start, w.end) for w in self.shifted_windows]} if self.shifted_windows else {}),
            "window_prompts": [[(i, round(x, 4)) for i, x in w.prompt_weights] for w in self.windows],
            "output": f"{self.output_width}x{self.output_height}@{self.output_fps}",
            "output_frames": self.output_num_frames,
            "steps": self.num_inference_steps,
            "seed": self.seed,
        }


def native_frame_count(duration_s: float, native_fps: int) -> int:
    """Smallest 4k+1 pixel frame count covering `duration_s` at `native_fps`."""
    intervals = math.ceil(round(duration_s * native_fps, 6))
    return VAE_TEMPORAL * math.ceil(intervals / VAE_TEMPORAL) + 1


def overlap_for(temporal_consistency: float, window_latent_frames: int) -> int:
    """Latent frames shared by neighbouring windows: more consistency, more overlap.

    0.7 -> ~20% of a window, 1.0 -> ~50%; at least 1 frame, always less than a window.
    """
    overlap = round(window_latent_frames * (temporal_consistency - 0.5))
    return max(1, min(window_latent_frames - 1, overlap))


def sliding_windows(latent_frames: int, window: int, overlap: int) -> list[Window]:
    """Cover [0, latent_frames) with windows of `window` frames overlapping by >= `overlap`.

    As few windows as a stride of `window - overlap` needs, spread evenly from 0 to
    `latent_frames - window`: every window has the same length (the model's native one), and the
    frames left over by the stride go to every seam alike (e.g. 61 latent frames, windows of 21,
    overlap 8: starts 0, 10, 20, 30, 40, overlaps 11) instead of a last window that repeats
    almost all of the one before it (starts 0, 13, 26, 39, 40).
    """
    if latent_frames <= window:
        return [Window(start=0, end=latent_frames)]
    span = latent_frames - window
    gaps = math.ceil(span / (window - overlap))
    starts = [round(i * span / gaps) for i in range(gaps + 1)]
    return [Window(start=s, end=s + window) for s in starts]


def shifted_partitions(latent_frames: int, window: int, overlap: int) -> tuple[list[Window], list[Window]]:
    """Two tilings of [0, latent_frames) by windows of at most `window` frames, neighbours
    overlapping by `overlap` (even, small: a blend across the boundary, not a second prediction
    of a third of the window).

    The first cuts the video into the fewest near-equal pieces; the second cuts it at the
    middles of the first's pieces (one piece more, half-length ones at the ends). Each piece
    grows by `overlap / 2` frames into each neighbour. Alternating the two step by step, no
    boundary stays in place for two steps in a row. A video of one window has one tiling (the
    second is empty).
    """
    if latent_frames <= window:
        return [Window(start=0, end=latent_frames)], []
    half = overlap // 2
    count = math.ceil(latent_frames / (window - 2 * half))
    bounds = [round(i * latent_frames / count) for i in range(count + 1)]
    middles = [(a + b) // 2 for a, b in zip(bounds, bounds[1:])]

    def tiling(cuts: list[int]) -> list[Window]:
        return [Window(start=max(0, a - half), end=min(latent_frames, b + half))
                for a, b in zip(cuts, cuts[1:]) if b > a]

    return tiling(bounds), tiling([0, *middles, latent_frames])


def scale_to_long_side(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(width, height) scaled down so the long side is at most `max_side`, multiples of 16, aspect kept."""
    scale = min(1.0, max_side / max(width, height))
    step = VAE_SPATIAL * PATCH_SPATIAL
    return (max(step, round(width * scale / step) * step), max(step, round(height * scale / step) * step))


def _with_prompts(window: Window, native_fps: int, times: list[tuple[float, int]]) -> Window:
    """`window` with the prompts in force over its frames (keyframe schedule `times`)."""
    weights = window_prompt_weights(window.start, window.end, native_fps, times, VAE_TEMPORAL)
    dominant = max(weights, key=lambda iw: iw[1])[0]  # first of equals: the earlier prompt
    return Window(start=window.start, end=window.end, prompt_index=dominant, prompt_weights=weights)


def _check_profile_bounds(request: VideoRequest, config: AppConfig, profile: ModelProfile) -> None:
    errors = []
    if request.style not in config.styles:
        errors.append(field_error("style", request.style, "unknown style", sorted(config.styles)))
    if request.resolution not in profile.resolutions:
        errors.append(
            field_error(
                "resolution",
                request.resolution,
                f"not available on profile {profile.name}",
                list(profile.resolutions),
            )
        )
    if request.duration > profile.max_duration_s:
        errors.append(field_error("duration", request.duration, *duration_limit(profile)))
    if request.num_inference_steps is not None and request.num_inference_steps > profile.max_steps:
        errors.append(
            field_error(
                "num_inference_steps", request.num_inference_steps, "too many steps", f"1..{profile.max_steps}"
            )
        )
    if request.guidance_scale is not None and request.guidance_scale > profile.max_guidance_scale:
        errors.append(
            field_error(
                "guidance_scale", request.guidance_scale, "too high", f"1.0..{profile.max_guidance_scale:g}"
            )
        )
    if errors:
        raise InvalidRequest(errors)


def build_plan(
    request: VideoRequest,
    config: AppConfig,
    seed: int | None = None,
    *,
    max_side_px: int | None = None,
    latent_frames: int | None = None,
) -> GenerationPlan:
    """Validate `request` against the profile and compute the plan.

    Args:
        request: a validated request.
        config: the application config (profile, styles).
        seed: seed to use when the request has none (default: a fresh random one, recorded
            in the plan so the job can be reproduced).
        max_side_px: render below the profile's native size, its long side at most this
            (`scale_to_long_side`); for short probes such as attention maps.
        latent_frames: render exactly this many latent frames, in one window on the first
            prompt, instead of covering the request's duration (at most one model window);
            for short probes such as attention maps. The output fields still follow the request.

    Returns:
        The plan every stage reads.

    Raises:
        InvalidRequest: a field is outside what this profile allows.
    """
    profile = config.model_profile
    _check_profile_bounds(request, config, profile)
    schedule = build_schedule(request, config.styles)  # structured fields, negatives, time directives

    native_w, native_h = profile.native_sizes[request.aspect]
    if max_side_px is not None:
        native_w, native_h = scale_to_long_side(native_w, native_h, max_side_px)
    window_latent = (profile.max_window_frames - 1) // VAE_TEMPORAL + 1
    shifted: list[Window] = []
    if latent_frames is None:
        num_frames = native_frame_count(request.duration, profile.native_fps)
        latent_frames = (num_frames - 1) // VAE_TEMPORAL + 1
        if profile.window_schedule == "shifted":
            # A quarter of the overlapping schedule's overlap on each side of a boundary (at least one frame)
            overlap = 2 * max(1, overlap_for(request.temporal_consistency, window_latent) // 4)
            windows, shifted = shifted_partitions(latent_frames, window_latent, overlap)
        else:
            overlap = overlap_for(request.temporal_consistency, window_latent)
            windows = sliding_windows(latent_frames, window_latent, overlap)
        windows, shifted = ([_with_prompts(w, profile.native_fps, schedule.times()) for w in tiling]
                            for tiling in (windows, shifted))
    else:
        if not 1 <= latent_frames <= window_latent:
            raise ValueError(f"latent_frames={latent_frames}: must be 1..{window_latent} (one model window)")
        num_frames = VAE_TEMPORAL * (latent_frames - 1) + 1
        overlap = 0
        windows = [Window(start=0, end=latent_frames)]
    out_w, out_h = output_size(request.resolution, request.aspect)
    if request.seed is not None:
        seed = request.seed
    elif seed is None:
        seed = secrets.randbits(63)

    return GenerationPlan(
        prompts=schedule.prompts,
        negative_prompt=schedule.negative_prompt,
        style=schedule.style,
        style_lora=schedule.style in config.style_adapters,
        seed=seed,
        num_inference_steps=request.num_inference_steps or profile.default_steps,
        guidance_scale=request.guidance_scale or profile.default_guidance_scale,
        step_cache=request.step_cache or profile.step_cache,
        native_width=native_w,
        native_height=native_h,
        native_fps=profile.native_fps,
        num_frames=num_frames,
        latent_frames=latent_frames,
        latent_height=native_h // VAE_SPATIAL,
        latent_width=native_w // VAE_SPATIAL,
        windows=windows,
        overlap_latent_frames=overlap,
        shifted_windows=shifted,
        duration_s=request.duration,
        output_width=out_w,
        output_height=out_h,
        output_fps=request.fps,
        output_num_frames=round(request.duration * request.fps),
        motion_intensity=request.motion_intensity,
        color_palette=request.color_palette,
        camera_motion=request.camera_motion,
        temporal_consistency=request.temporal_consistency,
        keyframes=[Keyframe(time_s=k.time_s, prompt=schedule.prompts[k.prompt_index]) for k in schedule.keyframes],
        prompt_warnings=schedule.warnings,
    )
