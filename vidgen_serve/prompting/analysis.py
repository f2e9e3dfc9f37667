"""The prompt analysis document: `POST /v1/prompt/analyze` and `vidgen-serve analyze` return this.

Both build it with `analyze` + `analysis_document`; only the token counter differs (the
HTTP route asks the TextEncoder deployment, the CLI loads the checkpoint's tokenizer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .compose import PromptSchedule, build_schedule

if TYPE_CHECKING:
    from ..config import AppConfig
    from ..plan import GenerationPlan
    from ..request import VideoRequest

# The request fields the analysis reads (everything else about a video does not change the text side).
ANALYZED_FIELDS = ("prompt", "negative_prompt", "style", "duration", "keyframes", "motion_intensity",
                   "color_palette", "camera_motion", "temporal_consistency")


@dataclass
class Analysis:
    """A request's text side before token counting: its schedule and plan."""

    request: "VideoRequest"
    schedule: PromptSchedule
    plan: "GenerationPlan"

    @property
    def texts(self) -> list[str]:
        """What the encoder sees, in the order `analysis_document` expects the counts: prompts, then negative."""
        return [*self.plan.prompts, self.plan.negative_prompt]


def analyze(request: "VideoRequest", config: "AppConfig") -> Analysis:
    """Parse and plan `request` (raises `InvalidRequest` only for what a generation would refuse too)."""
    from ..plan import build_plan

    plan = build_plan(request, config, seed=0)  # the seed plays no part in the analysis
    return Analysis(request, build_schedule(request, config.styles), plan)


def _pixel_frame(latent: int, last: bool, temporal: int = 4) -> int:
    """First (or last) pixel frame of latent frame `latent`."""
    if latent == 0:
        return 0
    return temporal * latent if last else temporal * (latent - 1) + 1


def analysis_document(analysis: Analysis, tokens: list[int] | None, limit: int | None,
                      token_error: str | None = None) -> dict[str, Any]:
    """The JSON document: parse, final prompts, keyframe schedule per window, token counts, warnings.

    Args:
        analysis: from `analyze`.
        tokens: token counts of `analysis.texts` (None: could not be counted).
        limit: the encoder's `max_sequence_length`.
        token_error: why tokens could not be counted (becomes a warning).
    """
    plan, schedule, parsed = analysis.plan, analysis.schedule, analysis.schedule.parsed
    fps, duration = plan.native_fps, plan.duration_s
    warnings = list(schedule.warnings)
    windows = []
    for k, w in enumerate(plan.windows):
        first, last = _pixel_frame(w.start, False), _pixel_frame(w.end - 1, True)
        windows.append({
            "index": k,
            "latent_frames": [w.start, w.end],
            "seconds": [round(first / fps, 3), round(min((last + 1) / fps, duration), 3)],
            "prompt_index": w.prompt_index,
            "prompt_weights": [{"prompt": i, "weight": round(x, 4)} for i, x in w.prompt_weights],
        })
    token_doc: dict[str, Any] = {"prompts": None, "prompt": None, "negative_prompt": None, "limit": limit}
    truncated = False
    if tokens is not None:
        counts = list(tokens)
        token_doc.update(prompts=counts[:-1], prompt=counts[0], negative_prompt=counts[-1])
        names = ["prompt" if i == 0 else f"prompts.{i}" for i in range(len(counts) - 1)] + ["negative_prompt"]
        for name, n in zip(names, counts):
            if limit is not None and n > limit:
                truncated = True
                warnings.append(f"{name} is {n} tokens; the encoder keeps the first {limit}, the rest is ignored")
    elif token_error:
        warnings.append(f"token counts unavailable: {token_error}")
    return {
        "prompt": analysis.request.prompt,
        "style": plan.style,
        "duration_s": duration,
        "parse": {
            "structured": parsed.structured,
            "fields": dict(parsed.fields),
            "unknown_keys": dict(parsed.unknown_keys),
            "free_text": list(parsed.free_text),
            "negatives": list(parsed.negatives),
            "directives": [{"time_s": d.time_s, "text": d.text} for d in parsed.directives],
        },
        "prompts": list(plan.prompts),
        "negative_prompt": plan.negative_prompt,
        "keyframes": [{"time_s": k.time_s, "text": k.text, "source": k.source, "prompt_index": k.prompt_index}
                      for k in schedule.keyframes],
        "windows": windows,
        "tokens": token_doc,
        "truncated": truncated,
        "warnings": warnings,
    }
