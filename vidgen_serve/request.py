"""The request contract: one pydantic model, exported as JSON Schema.

Static bounds live here. Bounds that depend on the model profile (styles, resolutions,
steps, guidance, max duration) are checked when the request becomes a `GenerationPlan`
(see `vidgen_serve.plan`), with the same error shape.
"""

from __future__ import annotations

import functools
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from .config import StepCache
from .errors import from_validation_error

MAX_PROMPT_CHARS = 2000
MAX_KEYFRAMES = 32
HARD_MAX_DURATION_S = 120.0  # no profile may go past this


class Keyframe(BaseModel):
    """A prompt that takes over at a point in time (prompt schedule across windows)."""

    model_config = ConfigDict(extra="forbid")

    time_s: float = Field(ge=0, le=HARD_MAX_DURATION_S, description="Seconds from the start of the video.")
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="What is shown from this time on.")


class VideoRequest(BaseModel):
    """A text-to-video request, as POSTed to `/v1/video/generate` (and `vidgen-serve generate --request`)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"title": "VideoRequest"})

    prompt: str = Field(
        min_length=1,
        max_length=MAX_PROMPT_CHARS,
        description="What to show. Free text, or structured ('主体:熊猫;动作:吃竹子;场景:竹林;风格:3D动画').",
    )
    negative_prompt: str | None = Field(
        None, max_length=MAX_PROMPT_CHARS, description="What not to show (classifier-free guidance negative)."
    )
    style: str = Field(
        "realistic",
        min_length=1,
        max_length=64,
        description="Style preset name (see GET /v1/schema for the configured list).",
    )
    duration: float = Field(
        5.0,
        ge=1,
        le=HARD_MAX_DURATION_S,
        description="Seconds. 1..15 natively; longer up to the profile's max_duration_s by sliding windows.",
    )
    fps: int = Field(30, ge=15, le=60, description="Output frame rate (motion-interpolated from the native rate).")
    resolution: Literal["480p", "720p", "1080p", "4k"] = Field(
        "720p", description="Output resolution (4k only where the profile allows it)."
    )
    aspect: Literal["16:9", "9:16", "1:1"] = Field("16:9", description="Aspect ratio.")
    motion_intensity: float = Field(1.0, ge=0.1, le=1.5, description="Amount of motion (low = calmer).")
    color_palette: Literal["warm", "cool", "neutral"] = Field("neutral", description="Colour grade.")
    camera_motion: Literal["static", "pan", "zoom"] = Field("static", description="Camera move.")
    temporal_consistency: float = Field(
        0.85, ge=0.7, le=1.0, description="Window overlap / seam blending / deflicker strength."
    )
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Same seed + same request = same frames.")
    keyframes: list[Keyframe] | None = Field(
        None, max_length=MAX_KEYFRAMES, description="Prompt schedule: prompts that take over at given times."
    )
    num_inference_steps: int | None = Field(None, ge=1, le=200, description="Sampler steps (bounded by profile).")
    guidance_scale: float | None = Field(None, ge=1.0, le=30.0, description="CFG scale (bounded by profile).")
    step_cache: StepCache | None = Field(
        None, description="Denoiser step caching (faster, slightly different frames); default: the profile's."
    )

    @model_validator(mode="after")
    def _keyframes_within_duration(self) -> "VideoRequest":
        for i, kf in enumerate(self.keyframes or []):
            if kf.time_s > self.duration:
                # The context names the offending field, so the error reports keyframes.<i>.time_s,
                # its value and the allowed range (a model-level error would only say "body").
                raise PydanticCustomError(
                    "keyframe_past_duration",
                    "keyframe time_s={time_s} is past the video's duration={duration}",
                    {
                        "time_s": kf.time_s,
                        "duration": self.duration,
                        "field": f"keyframes.{i}.time_s",
                        "value": kf.time_s,
                        "allowed": f"0..{self.duration:g}",
                    },
                )
        return self


@functools.cache
def request_schema() -> dict[str, Any]:
    """JSON Schema of `VideoRequest` (computed once; treat as read-only)."""
    return VideoRequest.model_json_schema()


def parse_request(data: Any) -> VideoRequest:
    """Validate a decoded JSON body (or a JSON string) into a `VideoRequest`.

    Raises:
        InvalidRequest: naming every bad field, its value and the allowed values.
    """
    try:
        if isinstance(data, (str, bytes)):
            return VideoRequest.model_validate_json(data)
        return VideoRequest.model_validate(data)
    except ValidationError as exc:
        raise from_validation_error(exc, request_schema()) from None


def schema_json() -> str:
    """The request JSON Schema as pretty-printed text."""
    return json.dumps(request_schema(), indent=2, ensure_ascii=False)
