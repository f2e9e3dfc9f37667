"""Prompt understanding: structured prompts, negative phrases, time directives, control descriptors.

Pure functions of the text (no model): `parse_prompt` reads a prompt, `build_schedule` turns
a request into the final prompts, negative prompt and keyframe schedule the plan carries,
and `analysis` builds the document `POST /v1/prompt/analyze` and `vidgen-serve analyze` return.
"""

from .compose import (
    PromptSchedule,
    ScheduledKeyframe,
    build_schedule,
    compose,
    descriptors,
    style_preset_for,
    window_prompt_weights,
)
from .parser import Directive, ParsedPrompt, parse_prompt

__all__ = [
    "Directive",
    "ParsedPrompt",
    "PromptSchedule",
    "ScheduledKeyframe",
    "build_schedule",
    "compose",
    "descriptors",
    "parse_prompt",
    "style_preset_for",
    "window_prompt_weights",
]
