"""Typed configuration: model profiles, style presets and serving settings.

Everything is a pydantic model loaded once (from `serve_config.yaml` application args,
or CLI flags) and passed down. Environment variables are read only here, for flags and
test overrides (`VIDGEN_CACHE_DIR`, `VIDGEN_PROFILE`).
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Aspect = Literal["16:9", "9:16", "1:1"]
Resolution = Literal["480p", "720p", "1080p", "4k"]
StepCache = Literal["off", "first_block", "taylorseer"]
# diffusers' attention dispatcher backends that run without downloading kernels at run time.
AttentionBackend = Literal[
    "native", "_native_cudnn", "_native_flash", "_native_efficient", "_native_math", "flash", "_flash_3", "sage",
    "xformers",
]
# Adapter references resolved to the LoRAs built next to the tiny checkpoint (models/tiny.py).
BUILTIN_TINY_LORA = "builtin:tiny-lora/"
# Checkpoint ids whose architecture is built in (configs in code): `weights: random` needs no download.
RANDOM_WEIGHTS_ARCHITECTURES = ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "Wan-AI/Wan2.1-T2V-14B-Diffusers")

# Output presets: (width, height) for 16:9; 9:16 swaps them, 1:1 squares the short side.
RESOLUTION_PRESETS: dict[str, tuple[int, int]] = {
    "480p": (854, 480),
    "720p": (1280, 720),
    "1080p": (1920, 1080),
    "4k": (3840, 2160),
}

def output_size(resolution: str, aspect: str) -> tuple[int, int]:
    """Output (width, height) for a resolution preset and an aspect ratio."""
    width, height = RESOLUTION_PRESETS[resolution]
    if aspect == "9:16":
        return height, width
    if aspect == "1:1":
        return height, height
    return width, height


class StylePreset(BaseModel):
    """A named style: prompt and negative templates, optionally a LoRA adapter."""

    model_config = ConfigDict(extra="forbid")

    prompt_template: str = Field(
        "{prompt}", description="Template applied to the user's prompt; must contain '{prompt}'."
    )
    negative_template: str = Field(
        "", description="Negative prompt added under this style (joined with the user's negative prompt)."
    )
    lora: str | None = Field(
        None,
        description="Optional LoRA adapter loaded into the denoiser for this style: a local diffusers LoRA file or "
        "directory (pytorch_lora_weights.safetensors), a hub id, or 'builtin:tiny-lora/<name>' (tiny checkpoint "
        "only). Unset: the profile's `style_loras` entry for this style, if any.",
    )

    @model_validator(mode="after")
    def _has_placeholder(self) -> "StylePreset":
        if "{prompt}" not in self.prompt_template:
            raise ValueError("prompt_template must contain '{prompt}'")
        return self


DEFAULT_STYLES: dict[str, StylePreset] = {
    "realistic": StylePreset(
        prompt_template="{prompt}, photorealistic, natural lighting, highly detailed",
        negative_template="cartoon, anime, illustration, painting",
    ),
    "anime": StylePreset(
        prompt_template="{prompt}, anime style, cel shading, vibrant colors",
        negative_template="photorealistic, photo",
    ),
    "3d-animation": StylePreset(
        prompt_template="{prompt}, 3D animation, Pixar style render, soft global illumination",
        negative_template="photo, flat 2D",
    ),
    "ink-wash": StylePreset(
        prompt_template="{prompt}, Chinese ink wash painting, 水墨画, flowing brush strokes",
        negative_template="photorealistic, saturated colors",
    ),
    "cinematic": StylePreset(
        prompt_template="{prompt}, cinematic shot, anamorphic lens, film grain, dramatic lighting",
        negative_template="amateur, overexposed",
    ),
}


class ParallelLayout(BaseModel):
    """How the denoiser's worker group splits the work; the group has ``tp * ulysses * cfg`` ranks.

    Ranks are laid out with ``tp`` innermost (its all-reduces are the most frequent), then
    ``ulysses``, then ``cfg``: rank = (cfg_index * ulysses + ulysses_index) * tp + tp_index.
    See docs/parallel.md.
    """

    model_config = ConfigDict(extra="forbid")

    tp: int = Field(1, ge=1, le=16, description="Tensor-parallel ranks: DeepSpeed shards each linear (heads/tp per rank).")
    ulysses: int = Field(
        1, ge=1, le=16,
        description="Ulysses sequence-parallel ranks: tokens split across ranks, all-to-all to heads around self-attention.",
    )
    cfg: Literal[1, 2] = Field(
        1, description="Classifier-free-guidance ranks: 2 runs the conditional and unconditional passes on two rank sets."
    )

    @property
    def size(self) -> int:
        """Ranks in the group (the product of the three degrees)."""
        return self.tp * self.ulysses * self.cfg


class ModelProfile(BaseModel):
    """A model checkpoint and how to run it (device, dtype, native sizes, limits)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Profile name.")
    checkpoint: str = Field(
        description="'builtin:tiny' (built locally on first use) or a local path / hub id of a diffusers Wan "
        "2.1 T2V checkpoint (model_index.json layout)."
    )
    device: Literal["cpu", "cuda"] = Field("cpu", description="Device the stages run on.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Dtype of the text encoder and the transformer."
    )
    vae_dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Dtype of the VAE.")
    native_sizes: dict[Aspect, tuple[int, int]] = Field(
        description="Native (width, height) the model renders at, per aspect; multiples of 16."
    )
    native_fps: int = Field(ge=1, le=60, description="Frame rate the model was trained at.")
    max_window_frames: int = Field(
        ge=5, description="Most pixel frames the model generates in one window (4k+1, e.g. 81 for Wan 2.1)."
    )
    max_duration_s: float = Field(
        ge=1, description="Longest video accepted; longer than one window uses sliding windows."
    )
    resolutions: list[Resolution] = Field(
        default_factory=lambda: ["480p", "720p", "1080p"], description="Output resolutions this profile allows."
    )
    default_steps: int = Field(ge=1, description="Default num_inference_steps.")
    max_steps: int = Field(ge=1, description="Upper bound on num_inference_steps.")
    default_guidance_scale: float = Field(ge=1.0, description="Default classifier-free guidance scale.")
    max_guidance_scale: float = Field(ge=1.0, description="Upper bound on guidance_scale.")
    max_sequence_length: int = Field(ge=8, description="Text encoder token limit (prompt is truncated past it).")
    num_attention_heads: int = Field(ge=1, description="Transformer attention heads (checked against the parallel layout).")
    parallel: ParallelLayout = Field(
        default_factory=ParallelLayout,
        description="Layout of the denoiser's worker group {tp, ulysses, cfg}; `tensor_parallel_size: N` is "
        "accepted as the short form of `parallel: {tp: N}`.",
    )
    gpus_per_node: int = Field(8, ge=1, description="GPUs on one node: the denoiser's worker group must fit one node.")
    text_cache_size: int = Field(256, ge=0, description="Prompt embeddings kept in the text encoder's LRU cache.")
    style_loras: dict[str, str] = Field(
        default_factory=dict,
        description="LoRA adapters this checkpoint's styles use, by style name (a style preset's own `lora` wins). "
        "Adapters are trained for one checkpoint, so they belong to the profile, not to the style.",
    )
    x264_preset: str = Field("veryfast", description="libx264 preset for the MP4 encode.")
    x264_crf: int = Field(20, ge=0, le=51, description="libx264 constant rate factor.")
    interpolation: Literal["mci", "blend"] = Field(
        "mci", description="ffmpeg minterpolate mode for frame-rate conversion (mci = motion compensated)."
    )
    # --- real architectures and speed options (docs/gpu.md) ---
    weights: Literal["checkpoint", "random"] = Field(
        "checkpoint",
        description="'checkpoint': load the checkpoint's weights (from_pretrained). 'random': build the checkpoint's "
        f"architecture (built in for {', '.join(RANDOM_WEIGHTS_ARCHITECTURES)}; read from the directory for a local "
        "checkpoint) with random weights, directly on the device in `dtype`: no download, for memory and speed checks.",
    )
    attention_backend: AttentionBackend = Field(
        "native",
        description="diffusers attention backend of the transformer ('native' = torch SDPA's own choice; "
        "'_native_cudnn' / '_native_flash' / '_native_efficient' pin an SDPA kernel on CUDA; '_native_math' anywhere; "
        "'flash' / '_flash_3' / 'sage' / 'xformers' need their package).",
    )
    compile: bool = Field(
        False,
        description="Regional torch.compile of the transformer's repeated blocks, compiled when the replica starts "
        "(a warm-up over the profile's shapes), so no request pays for it.",
    )
    compile_backend: Literal["inductor", "aot_eager"] = Field(
        "inductor", description="torch.compile backend ('aot_eager' traces without code generation: CPU tests)."
    )
    window_schedule: Literal["overlap", "shifted"] = Field(
        "overlap",
        description="How videos longer than one model window are denoised. 'overlap': windows overlap by "
        "temporal_consistency's share and their predictions are blended (each overlapped frame is predicted "
        "twice per step). 'shifted': every step tiles the video with windows that overlap by only 2-4 latent "
        "frames, alternating between two tilings whose boundaries are half a window apart, so a frame is "
        "predicted about once per step (the cost per second of video stays flat as videos get longer).",
    )
    step_cache: StepCache = Field(
        "off",
        description="Default step caching of the denoiser through diffusers' cache hooks ('first_block' = "
        "FirstBlockCache, 'taylorseer' = TaylorSeer); a request may choose its own. 'off' is the plain path exactly.",
    )
    step_cache_threshold: float = Field(
        0.05, gt=0, le=1, description="FirstBlockCache threshold (higher skips more steps, lower quality)."
    )
    quantization: Literal["none", "int8_weight_only", "float8_dynamic"] = Field(
        "none",
        description="Transformer linear layers through torchao (diffusers' TorchAoConfig): int8 weight-only halves "
        "the weights' memory; float8_dynamic computes in FP8 (CUDA compute capability >= 8.9, e.g. H100).",
    )
    text_encoder_quantization: Literal["none", "int8_weight_only"] = Field(
        "none", description="UMT5 encoder linear layers: int8 weight-only through torchao (transformers' TorchAoConfig)."
    )
    vae_tiling: bool = Field(False, description="Decode the VAE in overlapping spatial tiles (less memory).")
    vae_tile_px: int = Field(
        256, ge=32, multiple_of=16, description="Tile size in pixels when vae_tiling is on (stride = 3/4 of it)."
    )
    video_encoder: Literal["auto", "libx264", "h264_nvenc"] = Field(
        "auto",
        description="H.264 encoder: 'auto' uses h264_nvenc where ffmpeg can open it (L4, L40S...; not A100/H100) "
        "and libx264 otherwise.",
    )
    decoder_threads: int | None = Field(
        None, ge=1, le=256,
        description="CPU threads for post-processing and x264 (default: the replica's CPUs, from Ray's "
        "OMP_NUM_THREADS but at least 2 where the process may run on 2 cores, or the process's CPU affinity).",
    )

    @model_validator(mode="before")
    @classmethod
    def _tensor_parallel_size_alias(cls, data):
        """``tensor_parallel_size: N`` is the short form of ``parallel: {tp: N}`` (merged with a given layout)."""
        if not isinstance(data, dict) or "tensor_parallel_size" not in data:
            return data
        data = dict(data)
        tp = data.pop("tensor_parallel_size")
        layout = data.get("parallel")
        layout = layout.model_dump(exclude_unset=True) if isinstance(layout, ParallelLayout) else dict(layout or {})
        if "tp" in layout and layout["tp"] != tp:
            raise ValueError(f"tensor_parallel_size={tp} conflicts with parallel.tp={layout['tp']} "
                             f"(tensor_parallel_size is the short form of parallel.tp: give one)")
        data["parallel"] = {**layout, "tp": tp}
        return data

    @property
    def tensor_parallel_size(self) -> int:
        """``parallel.tp`` (the name the tensor-parallel code and older configs use)."""
        return self.parallel.tp

    @model_validator(mode="after")
    def _check(self) -> "ModelProfile":
        for aspect, (w, h) in self.native_sizes.items():
            if w % 16 or h % 16:
                raise ValueError(f"native_sizes[{aspect}]={w}x{h}: width and height must be multiples of 16")
        if (self.max_window_frames - 1) % 4:
            raise ValueError(f"max_window_frames={self.max_window_frames} must be 4k+1 (Wan VAE: 4x in time)")
        if self.default_steps > self.max_steps:
            raise ValueError(f"default_steps={self.default_steps} exceeds max_steps={self.max_steps}")
        if self.default_guidance_scale > self.max_guidance_scale:
            raise ValueError("default_guidance_scale exceeds max_guidance_scale")
        check_parallel(self)
        if self.window_schedule == "shifted" and self.compile:
            raise ValueError("window_schedule='shifted' with compile=true: shifted windows have lengths the "
                             "compile warm-up does not cover (each would compile inside a request); use one")
        if self.weights == "random" and not (
            self.checkpoint.startswith("builtin:") or self.checkpoint in RANDOM_WEIGHTS_ARCHITECTURES
            or Path(self.checkpoint).is_dir()
        ):
            raise ValueError(
                f"weights='random' needs the architecture of checkpoint={self.checkpoint!r}: use a local checkpoint "
                f"directory, 'builtin:tiny' or one of {list(RANDOM_WEIGHTS_ARCHITECTURES)}"
            )
        return self


def valid_tp_sizes(profile: ModelProfile) -> list[int]:
    """Tensor-parallel sizes a profile accepts: divisors of the heads (<= gpus_per_node on GPU)."""
    heads = profile.num_attention_heads
    limit = heads if profile.device != "cuda" else min(heads, profile.gpus_per_node)
    return [n for n in range(1, limit + 1) if heads % n == 0]


def check_parallel(profile: ModelProfile) -> ParallelLayout:
    """The profile's parallel layout, checked; ``ValueError`` naming the field and the valid values.

    ``tp * ulysses`` must divide ``num_attention_heads`` (each rank attends with
    heads/(tp*ulysses) heads: TP splits the heads, Ulysses' all-to-all splits them again) and, on
    GPU profiles, ``tp * ulysses * cfg`` must fit one node (``gpus_per_node``). `ModelProfile` runs
    this when validated; the worker group runs it again before starting workers (for profiles
    built without validation). ``cfg`` is 1 or 2 (checked by the field).
    """
    layout = profile.parallel
    heads = int(profile.num_attention_heads)
    tp, ulysses = int(layout.tp), int(layout.ulysses)
    valid_tp = valid_tp_sizes(profile)
    if tp < 1 or ulysses < 1:
        raise ValueError(f"parallel.tp={tp} and parallel.ulysses={ulysses} must be >= 1")
    if heads % tp:
        raise ValueError(
            f"profile {profile.name!r}: parallel.tp={tp} (tensor_parallel_size) must divide "
            f"num_attention_heads={heads} (each rank attends with heads/tp heads; valid sizes: {valid_tp})"
        )
    if heads % (tp * ulysses):
        valid_u = [u for u in range(1, heads // tp + 1) if (heads // tp) % u == 0]
        raise ValueError(
            f"profile {profile.name!r}: parallel.ulysses={ulysses} with tp={tp} needs num_attention_heads={heads} "
            f"divisible by tp*ulysses={tp * ulysses} (each rank attends with heads/(tp*ulysses) heads; "
            f"valid ulysses with tp={tp}: {valid_u})"
        )
    if profile.device == "cuda" and layout.size > profile.gpus_per_node:
        raise ValueError(
            f"profile {profile.name!r}: parallel tp*ulysses*cfg = {tp}*{ulysses}*{layout.cfg} = {layout.size} ranks "
            f"exceeds gpus_per_node={profile.gpus_per_node} (the worker group must fit one node, one GPU per rank)"
        )
    return layout


def check_tensor_parallel(profile: ModelProfile) -> int:
    """``check_parallel(profile).tp`` (kept for callers that only shard over TP)."""
    return check_parallel(profile).tp


_TINY_SIZES = {"16:9": (112, 64), "9:16": (64, 112), "1:1": (80, 80)}

PROFILES: dict[str, ModelProfile] = {
    "tiny": ModelProfile(
        name="tiny",
        checkpoint="builtin:tiny",
        native_sizes=_TINY_SIZES,
        native_fps=8,
        max_window_frames=41,
        max_duration_s=30,
        resolutions=["480p", "720p", "1080p"],
        default_steps=4,
        max_steps=50,
        default_guidance_scale=5.0,
        max_guidance_scale=20.0,
        max_sequence_length=64,
        num_attention_heads=4,
        style_loras={"ink-wash": "builtin:tiny-lora/ink-wash", "cinematic": "builtin:tiny-lora/cinematic"},
        x264_preset="superfast",
    ),
    "wan2.1-1.3b": ModelProfile(
        name="wan2.1-1.3b",
        checkpoint="Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
        device="cuda",
        dtype="bfloat16",
        native_sizes={"16:9": (832, 480), "9:16": (480, 832), "1:1": (624, 624)},
        native_fps=16,
        max_window_frames=81,
        max_duration_s=60,
        resolutions=["480p", "720p", "1080p"],
        default_steps=50,
        max_steps=100,
        default_guidance_scale=5.0,
        max_guidance_scale=20.0,
        max_sequence_length=512,
        num_attention_heads=12,
        x264_preset="medium",
    ),
    "wan2.1-14b-tp8": ModelProfile(
        name="wan2.1-14b-tp8",
        checkpoint="Wan-AI/Wan2.1-T2V-14B-Diffusers",
        device="cuda",
        dtype="bfloat16",
        native_sizes={"16:9": (1280, 720), "9:16": (720, 1280), "1:1": (960, 960)},
        native_fps=16,
        max_window_frames=81,
        max_duration_s=60,
        resolutions=["480p", "720p", "1080p", "4k"],
        default_steps=50,
        max_steps=100,
        default_guidance_scale=5.0,
        max_guidance_scale=20.0,
        max_sequence_length=512,
        num_attention_heads=40,
        parallel=ParallelLayout(tp=8),
        x264_preset="medium",
    ),
}
# The same 14B model on 8 GPUs with the layout that is fastest on paper for 720p on 8xA100
# (benchmarks/tp_paper.py, docs/parallel.md): Ulysses over 4 ranks x CFG over 2. Every GPU holds
# the whole bf16 transformer (28.6 GB), so it needs 80 GB cards; `wan2.1-14b-tp8` (3.6 GB of
# weights per GPU) stays the product's TP=8 layout.
PROFILES["wan2.1-14b-8gpu"] = ModelProfile.model_validate(
    {**PROFILES["wan2.1-14b-tp8"].model_dump(), "name": "wan2.1-14b-8gpu", "parallel": {"ulysses": 4, "cfg": 2}}
)


def default_cache_dir() -> Path:
    """Where locally built checkpoints live (`VIDGEN_CACHE_DIR`, else ~/.cache/vidgen-serve)."""
    return Path(os.environ.get("VIDGEN_CACHE_DIR") or Path.home() / ".cache" / "vidgen-serve")


class AppConfig(BaseModel):
    """The one configuration object: which profile, which styles, where state lives."""

    model_config = ConfigDict(extra="forbid")

    profile: str = Field("tiny", description=f"Model profile name ({', '.join(PROFILES)}).")
    profile_overrides: dict = Field(
        default_factory=dict, description="Fields overriding the named profile (e.g. parallel: {ulysses: 2}, "
        "tensor_parallel_size: 2)."
    )
    styles: dict[str, StylePreset] = Field(
        default_factory=lambda: dict(DEFAULT_STYLES), description="Style presets by name."
    )
    cache_dir: Path = Field(default_factory=default_cache_dir, description="Cache for locally built checkpoints.")

    @model_validator(mode="after")
    def _known_profile(self) -> "AppConfig":
        if self.profile not in PROFILES:
            raise ValueError(f"profile={self.profile!r} is unknown; valid profiles: {sorted(PROFILES)}")
        # `tensor_parallel_size` is accepted too: the short form of `parallel.tp`.
        valid = set(ModelProfile.model_fields) | {"tensor_parallel_size"}
        unknown = sorted(set(self.profile_overrides) - valid)
        if unknown:
            raise ValueError(
                f"profile_overrides: unknown field(s) {', '.join(map(repr, unknown))}; valid fields: "
                f"{', '.join(sorted(valid))}"
            )
        try:
            profile = self.model_profile  # validates overrides early
        except ValidationError as exc:
            # One line per bad field, named as the override was given (pydantic's messages list the valid values).
            raise ValueError("; ".join(
                f"profile_overrides.{'.'.join(map(str, e['loc']))}={e['input']!r}: {e['msg']}"
                if e["loc"] else f"profile {self.profile!r} with these overrides: {e['msg'].removeprefix('Value error, ')}"
                for e in exc.errors(include_url=False)
            )) from None
        for name, ref in self.style_adapters.items():
            if ref.startswith(BUILTIN_TINY_LORA) and profile.checkpoint != "builtin:tiny":
                raise ValueError(
                    f"styles.{name}.lora={ref!r}: the built-in tiny adapters fit only the 'builtin:tiny' checkpoint, "
                    f"not profile {profile.name!r} ({profile.checkpoint}); give the style a LoRA trained for it"
                )
        return self

    @cached_property
    def style_adapters(self) -> dict[str, str]:
        """LoRA adapter reference of each style that has one (the style's `lora`, else the profile's `style_loras`)."""
        loras = self.model_profile.style_loras
        return {name: style.lora or loras[name] for name, style in self.styles.items()
                if style.lora or loras.get(name)}

    @cached_property
    def model_profile(self) -> ModelProfile:
        """The named profile with overrides applied (validated)."""
        base = PROFILES[self.profile].model_dump()
        overrides = dict(self.profile_overrides)
        if "tensor_parallel_size" in overrides:
            # The short form of `parallel: {tp: N}` replaces the profile's layout as `parallel` would.
            base.pop("parallel")
        base.update(overrides)
        if base["checkpoint"] != "builtin:tiny" and "style_loras" not in overrides:
            # The built-in tiny adapters belong to the built-in checkpoint: another checkpoint
            # (e.g. `tiny` pointed at a local copy) keeps only the adapters meant for it.
            base["style_loras"] = {name: ref for name, ref in base.get("style_loras", {}).items()
                                   if not ref.startswith(BUILTIN_TINY_LORA)}
        return ModelProfile.model_validate(base)
