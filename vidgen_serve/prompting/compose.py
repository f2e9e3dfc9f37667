"""From a parsed prompt to what the model is conditioned on, over time.

`build_schedule` turns a request's prompt (and keyframes) into the distinct final prompts
(style template + creative-control descriptors), the negative prompt, and the times from
which each prompt is in force. `window_prompt_weights` says how much of each prompt a
sliding window of latent frames gets. Pure functions: no model, no torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .parser import ParsedPrompt, has_cjk, parse_prompt

if TYPE_CHECKING:
    from ..config import StylePreset
    from ..request import VideoRequest

# Ways of naming a style preset in a prompt's `风格`/`style` field (compared without spaces, `-`, `_`, case).
STYLE_ALIASES: dict[str, str] = {
    "3d动画": "3d-animation", "三维动画": "3d-animation", "3d": "3d-animation", "3danimation": "3d-animation",
    "3danimated": "3d-animation", "pixar": "3d-animation",
    "动漫": "anime", "动画": "anime", "日漫": "anime", "二次元": "anime", "anime": "anime", "manga": "anime",
    "写实": "realistic", "真实": "realistic", "照片": "realistic", "realistic": "realistic",
    "photorealistic": "realistic", "realism": "realistic", "photo": "realistic",
    "水墨": "ink-wash", "水墨画": "ink-wash", "国画": "ink-wash", "中国水墨": "ink-wash", "inkwash": "ink-wash",
    "ink": "ink-wash", "inkwashpainting": "ink-wash", "chineseinkwash": "ink-wash",
    "电影": "cinematic", "电影感": "cinematic", "电影质感": "cinematic", "cinematic": "cinematic",
    "cinema": "cinematic", "film": "cinematic", "movie": "cinematic",
}

MOTION_SLOW_BELOW = 0.4
MOTION_FAST_ABOVE = 1.2
PALETTE_DESCRIPTORS = {"warm": "warm color palette, golden tones", "cool": "cool color palette, blue tones"}
CAMERA_DESCRIPTORS = {"pan": "camera pans horizontally", "zoom": "camera slowly zooms in", "static": "static camera"}
_STRIP = " \t\r\n,，、;；:：。.!！?？|"


def _squash(text: str) -> str:
    return re.sub(r"[\s_\-]+", "", text.strip().lower())


def style_preset_for(value: str, styles: dict[str, "StylePreset"]) -> str | None:
    """The preset a `风格`/`style` field names (``3D动画`` -> ``3d-animation``), or None."""
    squashed = _squash(value)
    candidates = [squashed]
    for suffix in ("风格", "画风", "style", "风"):
        if squashed.endswith(suffix) and len(squashed) > len(suffix):
            candidates.append(squashed[: -len(suffix)])
    by_squashed = {_squash(name): name for name in styles}
    for c in candidates:
        if c in by_squashed:
            return by_squashed[c]
        alias = STYLE_ALIASES.get(c)
        if alias is not None and alias in styles:
            return alias
    return None


def descriptors(motion_intensity: float, color_palette: str, camera_motion: str | None) -> list[str]:
    """Prompt descriptors of the creative controls (camera_motion None: not asked for)."""
    out = []
    if motion_intensity < MOTION_SLOW_BELOW:
        out.append("slow, subtle motion")
    elif motion_intensity > MOTION_FAST_ABOVE:
        out.append("fast, dynamic motion")
    if color_palette in PALETTE_DESCRIPTORS:
        out.append(PALETTE_DESCRIPTORS[color_palette])
    if camera_motion is not None:
        out.append(CAMERA_DESCRIPTORS[camera_motion])
    return out


def compose(parsed: ParsedPrompt, style_as_text: bool = True) -> str:
    """The fields and free text as one model prompt (free text alone comes back as written).

    Chinese: ``熊猫在竹林中吃竹子``; English: ``panda eating bamboo in bamboo forest``; the other
    fields follow, comma-separated. `style_as_text`: keep a `style` field's text (False when it
    named a preset, whose template does the job).
    """
    f = parsed.fields
    if not parsed.structured:
        return parsed.free_text[0] if parsed.free_text else ""
    subject, action, scene = f.get("subject", ""), f.get("action", ""), f.get("scene", "")
    cjk = has_cjk(subject + action + scene) or (not (subject or action or scene) and has_cjk(parsed.text))
    if cjk:
        if scene and (subject or action) and not scene.startswith(("在", "于")):
            scene = f"在{scene}中"
        core = f"{subject}{scene}{action}" if (subject or action) else scene
    else:
        if scene and (subject or action) and not re.match(r"(in|on|at|under|inside|by|near|over|through)\b", scene,
                                                          re.I):
            scene = f"in {scene}"
        core = " ".join(p for p in (subject, action, scene) if p)
    extras = [f.get(name, "") for name in ("lighting", "camera", "mood", "color")]
    if style_as_text:
        extras.insert(0, f.get("style", ""))
    parts = [p for p in (core, *parsed.free_text, *extras) if p]
    return ("，" if cjk else ", ").join(parts)


def _styled(preset: "StylePreset", base: str, extra: list[str]) -> str:
    text = preset.prompt_template.format(prompt=base)
    if not base:
        text = text.strip(_STRIP)
    return ", ".join(p for p in (text, *extra) if p)


@dataclass
class ScheduledKeyframe:
    """A prompt in force from `time_s` on: where it came from and which of the final prompts it is."""

    time_s: float
    text: str  # before the style template and descriptors
    source: str  # "prompt" (a time directive) or "request" (the request's keyframes)
    prompt_index: int = 0


@dataclass
class PromptSchedule:
    """Everything the text side of a generation is conditioned on.

    Attributes:
        parsed: the parse of the request's prompt.
        style: the style preset in use.
        base: the prompt in force from t=0, before the style template.
        prompts: distinct final prompts (index 0: the base one).
        negative_prompt: the user's negative prompt, the extracted negatives, the style's template.
        keyframes: in time order, each with the index of its final prompt.
        warnings: everything that could not be used as written.
    """

    parsed: ParsedPrompt
    style: str
    base: str
    prompts: list[str]
    negative_prompt: str
    keyframes: list[ScheduledKeyframe] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def times(self) -> list[tuple[float, int]]:
        """(from time_s, prompt index), in time order, starting at 0."""
        return [(0.0, 0)] + [(k.time_s, k.prompt_index) for k in self.keyframes]


def _join(base: str, addition: str) -> str:
    if not base:
        return addition
    return base + ("，" if has_cjk(base[-1:]) else ", ") + addition


def build_schedule(request: "VideoRequest", styles: dict[str, "StylePreset"]) -> PromptSchedule:
    """Parse the request's prompt and keyframes into the final prompts, negative prompt and schedule.

    A `风格`/`style` field picks the preset when it names one and the request did not set
    `style` itself (a different explicit style wins, with a warning). Time directives become
    keyframes merged with the request's (sorted; at the same time the request's wins, with a
    warning); directives past the duration are dropped with a warning.
    """
    parsed = parse_prompt(request.prompt)
    warnings = list(parsed.warnings)
    style = request.style
    style_as_text = True
    if "style" in parsed.fields:
        named = style_preset_for(parsed.fields["style"], styles)
        if named is not None:
            style_as_text = False
            if "style" not in request.model_fields_set:
                style = named
            elif named != request.style:
                warnings.append(f"style conflict: the prompt asks for {parsed.fields['style']!r} ({named}) but the "
                                f"request sets style={request.style!r}; using {request.style!r}")
    base = compose(parsed, style_as_text)
    negatives = list(parsed.negatives)

    entries: list[ScheduledKeyframe] = []
    for d in parsed.directives:
        if d.time_s > request.duration:
            warnings.append(f"time directive at {d.time_s:g}s is past the video's duration ({request.duration:g}s); "
                            f"dropped")
            continue
        entries.append(ScheduledKeyframe(d.time_s, _join(base, d.text), "prompt"))
    requested: list[ScheduledKeyframe] = []
    for i, kf in enumerate(request.keyframes or []):
        kparsed = parse_prompt(kf.prompt)
        warnings += [f"keyframes.{i}.prompt: {w}" for w in kparsed.warnings]
        if kparsed.directives:
            warnings.append(f"keyframes.{i}.prompt: time directives inside a keyframe's prompt are ignored")
        negatives += kparsed.negatives
        # A keyframe with nothing to show but negatives keeps showing the base prompt.
        requested.append(ScheduledKeyframe(kf.time_s, compose(kparsed) or base, "request"))
    for r in requested:
        clash = [e for e in entries if e.source == "prompt" and abs(e.time_s - r.time_s) < 1e-9]
        for e in clash:
            warnings.append(f"the prompt's directive at {e.time_s:g}s is replaced by the request's keyframe at the "
                            f"same time")
            entries.remove(e)
    entries = sorted(entries + requested, key=lambda e: e.time_s)  # stable: equal request times keep their order

    preset = styles[style] if style in styles else None
    camera = request.camera_motion if ("camera_motion" in request.model_fields_set
                                       or request.camera_motion != "static") else None
    extra = descriptors(request.motion_intensity, request.color_palette, camera)

    def final(text: str) -> str:
        return _styled(preset, text, extra) if preset is not None else ", ".join(p for p in (text, *extra) if p)

    prompts = [final(base)]
    for e in entries:
        text = final(e.text)
        if text not in prompts:
            prompts.append(text)
        e.prompt_index = prompts.index(text)

    seen: list[str] = []
    for n in negatives:
        if n and n not in seen:
            seen.append(n)
    style_negative = preset.negative_template if preset is not None else ""
    negative = ", ".join(p for p in (request.negative_prompt, *seen, style_negative) if p)
    return PromptSchedule(parsed, style, base, prompts, negative, entries, warnings)


def latent_frame_time(index: int, native_fps: int, temporal: int = 4) -> float:
    """Seconds at which latent frame `index` starts (latent 0 is pixel frame 0; latent l>0 covers
    pixel frames temporal*(l-1)+1 .. temporal*l)."""
    return 0.0 if index == 0 else (temporal * (index - 1) + 1) / native_fps


def prompt_at(time_s: float, times: list[tuple[float, int]]) -> int:
    """The prompt index in force at `time_s` (the last entry starting at or before it)."""
    current = times[0][1]
    for start, index in times:
        if start <= time_s + 1e-9:
            current = index
    return current


def window_prompt_weights(start: int, end: int, native_fps: int, times: list[tuple[float, int]],
                          temporal: int = 4) -> list[tuple[int, float]]:
    """(prompt index, share of the window's latent frames under it), in order of first appearance."""
    counts: dict[int, int] = {}
    for frame in range(start, end):
        index = prompt_at(latent_frame_time(frame, native_fps, temporal), times)
        counts[index] = counts.get(index, 0) + 1
    total = end - start
    return [(index, n / total) for index, n in counts.items()]
