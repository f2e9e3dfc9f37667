"""Attention maps (the product guide's debugging tool): the request, its plan, and token fields.

`POST /v1/prompt/attention` and `vidgen-serve attention` run a short, low-resolution
generation of a prompt and show, for every prompt token (and every field of a structured
prompt), where in each frame the transformer's cross-attention looked. This module is the
torch-free part the ingress needs: the bounded request, the plan it becomes (a single
window of a few latent frames at most `ATTENTION_MAX_SIDE_PX` on the long side, step cache
off), and the mapping of structured fields (`主体:熊猫;动作:吃竹子`) onto tokens. The capture
and the PNG are `vidgen_serve.pipeline.attention_maps`.
"""

from __future__ import annotations


from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .config import AppConfig
from .errors import InvalidRequest, VidgenError, field_error
from .plan import VAE_TEMPORAL, GenerationPlan, build_plan, scale_to_long_side
from .request import parse_request

MAX_ATTENTION_PROMPT_CHARS = 500  # the grid has one column per token: keep it readable
MAX_ATTENTION_STEPS = 10
DEFAULT_ATTENTION_STEPS = 4
MAX_ATTENTION_FRAMES = 8  # latent frames = grid rows
DEFAULT_ATTENTION_FRAMES = 3
ATTENTION_MAX_SIDE_PX = 512  # the generation's long side (never above the profile's native size)


class AttentionRequest(BaseModel):
    """What `POST /v1/prompt/attention` reads (and `vidgen-serve attention` builds from its flags)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=MAX_ATTENTION_PROMPT_CHARS,
                        description="The prompt; free text or structured ('主体:熊猫;动作:吃竹子').")
    style: str | None = Field(None, min_length=1, max_length=64, description="A style preset name.")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Seed of the initial noise (default: random, "
                             "returned in the response).")
    steps: int = Field(DEFAULT_ATTENTION_STEPS, ge=1, le=MAX_ATTENTION_STEPS,
                       description="Denoising steps; the maps average over all of them.")
    frames: int = Field(DEFAULT_ATTENTION_FRAMES, ge=1, le=MAX_ATTENTION_FRAMES,
                        description="Latent frames generated (rows of the grid); each covers 4 video frames "
                        "after the first.")


def check_attention_supported(config: AppConfig) -> None:
    """501 on a parallel denoiser: its ranks hold shards of the heads (TP) or of the tokens (Ulysses)."""
    layout = config.model_profile.parallel
    if layout.size > 1:
        raise VidgenError(
            501, f"attention maps are not available on profile {config.model_profile.name!r}: its denoiser runs as a "
            f"parallel worker group (tp={layout.tp}, ulysses={layout.ulysses}, cfg={layout.cfg}) and the maps are "
            "read from a single-process transformer; use a profile with one denoiser process",
            code="not_implemented")


def low_resolution(width: int, height: int, max_side: int = ATTENTION_MAX_SIDE_PX) -> tuple[int, int]:
    """(width, height) scaled down so the long side is at most `max_side`, multiples of 16, aspect kept."""
    return scale_to_long_side(width, height, max_side)


def attention_plan(body: AttentionRequest, config: AppConfig) -> GenerationPlan:
    """The plan of an attention-map run: the prompt and style as a generation would use them, at
    low resolution, `frames` latent frames in one window, `steps` steps, step cache off.

    Raises:
        InvalidRequest: naming `style` (unknown), `steps` (past the profile) or `frames` (past one window).
    """
    profile = config.model_profile
    errors = []
    if body.steps > profile.max_steps:
        errors.append(field_error("steps", body.steps, "too many steps", f"1..{min(profile.max_steps, MAX_ATTENTION_STEPS)}"))
    window = (profile.max_window_frames - 1) // VAE_TEMPORAL + 1
    if body.frames > window:
        errors.append(field_error("frames", body.frames, "more latent frames than one model window",
                                  f"1..{min(window, MAX_ATTENTION_FRAMES)}"))
    if errors:
        raise InvalidRequest(errors)
    fields: dict[str, Any] = {"prompt": body.prompt, "num_inference_steps": body.steps, "duration": 1,
                              "step_cache": "off"}
    if body.style is not None:
        fields["style"] = body.style
    if body.seed is not None:
        fields["seed"] = body.seed
    return build_plan(parse_request(fields, profile), config, max_side_px=ATTENTION_MAX_SIDE_PX,
                      latent_frames=body.frames)


# ---- structured prompts: fields -> tokens ---------------------------------------------------

def field_tokens(prompt: str, encoded_text: str, spans: list[tuple[int, int]]) -> list[dict[str, Any]]:
    """Which tokens make up each field of a structured `prompt`.

    The fields are the prompt parser's (`vidgen_serve.prompting`): keys in their canonical names
    (`subject`, `action`, `scene`, ... ; unknown keys as written). The parser recomposes the fields
    into one sentence (`熊猫在竹林中吃竹子`), so each value is looked up in the encoded text on its own.

    Args:
        prompt: the user's prompt.
        encoded_text: the text the tokenizer saw (the styled prompt after the pipeline's cleaning).
        spans: each token's character span in `encoded_text`.

    Returns:
        [{"name", "value", "tokens": [token indices]}] for each field whose value appears in
        `encoded_text` and covers at least one token, in text order; [] for a prompt that is not
        structured. A value the style consumed (`风格:3D动画` selects a preset) has no column.
    """
    from .prompting.parser import parse_prompt

    parsed = parse_prompt(prompt)
    if not parsed.structured:
        return []
    found = []
    for key, value in [*parsed.fields.items(), *parsed.unknown_keys.items()]:
        value = " ".join(value.split())  # the pipeline's cleaning collapses whitespace
        start = encoded_text.find(value) if value else -1
        if start < 0:
            continue
        end = start + len(value)
        tokens = [i for i, (s, e) in enumerate(spans) if s < end and e > start]
        if tokens:
            found.append((start, {"name": key, "value": value, "tokens": tokens}))
    return [field for _, field in sorted(found, key=lambda item: item[0])]
