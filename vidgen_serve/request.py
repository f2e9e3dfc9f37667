"""The request contract: one pydantic model, exported as JSON Schema.

Static bounds live here. Bounds that depend on the model profile (styles, resolutions,
steps, guidance, max duration) are checked when the request becomes a `GenerationPlan`
(see `vidgen_serve.plan`), with the same error shape. The duration limit has one source
of truth, the active profile's `max_duration_s`: `request_schema(profile)` publishes it
and `parse_request(data, profile)` names it in errors; `HARD_MAX_DURATION_S` is only the
static guard no profile may exceed.
"""

from __future__ import annotations

import functools
import json
import copy
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from .config import StepCache
from .errors import InvalidRequest, from_validation_error

if TYPE_CHECKING:
    from .config import ModelProfile

MAX_PROMPT_CHARS = 2000
MAX_KEYFRAMES = 32
HARD_MAX_DURATION_S = 120.0  # no profile may go past this (the profile's max_duration_s is the real limit)
DEFAULT_REF_TEMPLATE = "#/$defs/{model}"


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
        description="Seconds, from 1 up to the active profile's max_duration_s (GET /v1/schema); a video "
        "longer than one model window is rendered as overlapping sliding windows.",
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
        0.85, ge=0.7, le=1.0, description="Overlap of the sliding windows of a long video (more = smoother seams)."
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


def not_yet_applied(request: VideoRequest) -> list[str]:
    """Warnings for the fields this request sets that are accepted but not yet applied.

    The list below is the one place that knows which creative controls no stage acts on
    yet. Whoever makes a control work deletes its entry here, and the warning (response
    header `X-Vidgen-Warnings`, job record `warnings`) goes away with it.

    Returns:
        One ``"<field>: <what happens>"`` line per field set to other than its default.
    """
    # Every field of today's request acts on the video: none is pending. A field added to the
    # contract before a stage acts on it gets its entry here until it does.
    pending: dict[str, str] = {}
    warnings = []
    for field, what in pending.items():
        default = VideoRequest.model_fields[field].get_default(call_default_factory=True)
        if (getattr(request, field) or None) != (default or None):  # None and [] both mean "not set"
            warnings.append(f"{field}: {what}")
    return warnings


def request_schema(profile: ModelProfile | None = None, ref_template: str = DEFAULT_REF_TEMPLATE) -> dict[str, Any]:
    """JSON Schema of `VideoRequest` (cached; treat as read-only).

    Args:
        profile: the active model profile: durations (and keyframe times) are then bounded
            by its `max_duration_s`. None: the static bounds only.
        ref_template: how `$ref`s are written (OpenAPI keeps models under
            ``#/components/schemas/``).
    """
    if profile is None:
        return _schema(None, None, ref_template)
    return _schema(profile.name, profile.max_duration_s, ref_template)


@functools.cache
def _schema(profile_name: str | None, max_duration_s: float | None, ref_template: str) -> dict[str, Any]:
    schema = VideoRequest.model_json_schema(ref_template=ref_template)
    if max_duration_s is None:
        return schema
    schema = copy.deepcopy(schema)
    limit = int(max_duration_s) if float(max_duration_s).is_integer() else max_duration_s
    duration = schema["properties"]["duration"]
    duration["maximum"] = limit
    duration["description"] = (
        f"Seconds, 1..{limit} on profile {profile_name}; a video longer than one model window is rendered as "
        "overlapping sliding windows."
    )
    schema["$defs"]["Keyframe"]["properties"]["time_s"]["maximum"] = limit
    return schema


def parse_request(data: Any, profile: ModelProfile | None = None) -> VideoRequest:
    """Validate a decoded JSON body (or a JSON string) into a `VideoRequest`.

    Args:
        data: the body.
        profile: the active model profile; errors then name its limits (e.g. a duration's
            allowed range is its ``1..max_duration_s``). The profile's bounds themselves are
            checked by `build_plan`.

    Raises:
        InvalidRequest: naming every bad field, its value and the allowed values.
    """
    try:
        if isinstance(data, (str, bytes)):
            return VideoRequest.model_validate_json(data)
        return VideoRequest.model_validate(data)
    except ValidationError as exc:
        error = from_validation_error(exc, request_schema(profile))
        if profile is None:
            raise error from None
        details = error.details
        for raw, detail in zip(exc.errors(include_url=False), details):
            # Past the static guard is past the profile's limit too: say it as `build_plan` does.
            if raw["type"] == "less_than_equal" and (detail["field"] == "duration"
                                                     or detail["field"].endswith(".time_s")):
                detail["message"] = duration_limit(profile)[0]
        raise InvalidRequest(details) from None


def duration_limit(profile: ModelProfile) -> tuple[str, str]:
    """(message, allowed range) of a duration past the profile's `max_duration_s`."""
    return f"longer than profile {profile.name} allows", f"1..{profile.max_duration_s:g}"


def schema_json(profile: ModelProfile | None = None) -> str:
    """The request JSON Schema as pretty-printed text (bounded by `profile` if given)."""
    return json.dumps(request_schema(profile), indent=2, ensure_ascii=False)
