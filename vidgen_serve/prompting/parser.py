"""Reading a prompt: structured fields, negative phrases and time directives.

A prompt is free text or structured: ``主体:熊猫;动作:吃竹子;场景:竹林;风格:3D动画`` or
``subject: panda; action: eating bamboo; scene: bamboo forest; style: 3D animation``, with
full-width (``：；，``) or ASCII separators, or one ``key: value`` per line. From either
kind the parser takes out

- negative phrases (``不要出现人类角色``, ``没有…``, ``不含…``, ``no humans``, ``without …``,
  ``avoid …``), which belong in the negative prompt, and
- time directives (``第3秒出现彩虹``, ``3秒时…``, ``at 3s: a rainbow appears``,
  ``after 5 seconds …``), which become keyframes.

Everything here is a pure function of the text. Nothing raises on odd input: problems are
reported as warnings in the result.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# Canonical field -> the keys (lower-case) that name it.
FIELD_KEYS: dict[str, tuple[str, ...]] = {
    "subject": ("subject", "main subject", "character", "主体", "主角", "角色", "人物"),
    "action": ("action", "activity", "动作", "行为", "动态"),
    "scene": ("scene", "setting", "background", "environment", "location", "场景", "背景", "环境", "地点"),
    "style": ("style", "风格", "画风"),
    "lighting": ("lighting", "light", "光线", "灯光", "光照"),
    "camera": ("camera", "shot", "镜头", "运镜", "机位"),
    "mood": ("mood", "atmosphere", "氛围", "情绪", "气氛"),
    "color": ("color", "colour", "colors", "colours", "色调", "颜色", "色彩"),
    "negative": ("negative", "negative prompt", "avoid", "负面", "负面提示", "不要", "避免"),
}
KEY_TO_FIELD = {key: name for name, keys in FIELD_KEYS.items() for key in keys}
# The fields the model prompt is composed of, in order (style is applied as a preset or kept as text).
COMPOSED_FIELDS = ("subject", "action", "scene", "style", "lighting", "camera", "mood", "color")

_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
_WORD = re.compile(r"[^\W_]", re.UNICODE)
_KNOWN_KEYS_RE = "|".join(sorted((re.escape(k) for k in KEY_TO_FIELD), key=len, reverse=True))
# `key: value` (ASCII or full-width colon); a key is a short run of letters (no digits: `at 3s:` is a time).
_KEY_VALUE = re.compile(r"^\s*([A-Za-z][A-Za-z _-]{0,23}|[\u3400-\u9fff]{1,8})\s*[:：]\s*(.*)$", re.S)
# Segments: `;`, `；`, `|` and line breaks; a comma (or full stop) too when a known key follows it.
_SEGMENT_SPLIT = re.compile(r"[;；|\r\n]+|[,，、。]\s*(?=(?:" + _KNOWN_KEYS_RE + r")\s*[:：])", re.I)
# Clauses inside a piece of text, for negative phrases (the separators are kept).
_CLAUSE_SPLIT = re.compile(r"([,，、;；。!！?？\r\n]+|\.(?:\s+|$))")

_NUM = r"(\d{1,6}(?:\.\d+)?)"
_DIRECTIVES = [
    # 第3秒出现彩虹 / 第3秒：… / 第 3 秒时 …
    re.compile(r"第\s*" + _NUM + r"\s*秒钟?(?:时|的时候|开始|起)?\s*[:：,，]?\s*"),
    # 3秒时… / 3秒后… / 3秒：…
    re.compile(r"(?<![\d.])" + _NUM + r"\s*秒钟?\s*(?:时|的时候|后|之后|以后|开始|起)\s*[:：,，]?\s*"),
    re.compile(r"(?<![\d.])" + _NUM + r"\s*秒钟?\s*[:：]\s*"),
    # at 3s: … / after 5 seconds … / at 2.5 s, … / from 4 sec on, …
    re.compile(r"\b(?:at|after|from)\s+" + _NUM + r"\s*(?:s|sec|secs|second|seconds)\b(?:\s+(?:on|onwards))?"
               r"\s*[:：,，]?\s*", re.I),
    # 3s: … (opening a clause, at most 3 digits: "the 1990s: …" is not a time)
    re.compile(r"(?:^|(?<=[;；,，。.!！?？\n]))\s*(\d{1,3}(?:\.\d+)?)\s*(?:s|sec|secs|seconds)\s*[:：]\s*", re.I),
]
# Negative markers: anywhere in a clause (Chinese imperatives, `without`), or only opening it.
_NEG_ANYWHERE = re.compile(
    r"(不要出现|不要有|不要|不能出现|不能有|不应出现|不出现|不含有|不含|不包含|不包括|禁止出现|禁止|避免出现|避免"
    r"|\bwithout\s+(?:any\s+)?|\bwith\s+no\s+|\bavoid(?:ing)?\s+)",
    re.I,
)
_NEG_OPENING = re.compile(r"^(没有|no\s+|not\s+|don'?t\s+(?:show|include)\s+|do\s+not\s+(?:show|include)\s+)", re.I)
_STRIP = " \t\r\n,，、;；:：。.!！?？|"


@dataclass
class Directive:
    """`at time_s, show text` as written in the prompt."""

    time_s: float
    text: str


@dataclass
class ParsedPrompt:
    """What the parser found in one prompt.

    Attributes:
        text: the prompt as given.
        structured: whether it was read as `key: value` fields.
        fields: canonical field -> value (subject, action, scene, style, lighting, camera, mood, color).
        unknown_keys: keys it did not recognise -> their values (kept in the prompt as written).
        free_text: text outside any field, in order (negatives and directives taken out).
        negatives: negative phrases, in order.
        directives: time directives, in order of appearance.
        warnings: what could not be used as written.
    """

    text: str
    structured: bool = False
    fields: dict[str, str] = field(default_factory=dict)
    unknown_keys: dict[str, str] = field(default_factory=dict)
    free_text: list[str] = field(default_factory=list)
    negatives: list[str] = field(default_factory=list)
    directives: list[Directive] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def has_cjk(text: str) -> bool:
    return bool(_CJK.search(text))


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip(_STRIP)


def _negative_split(clause: str) -> tuple[str, str | None]:
    """(what stays positive, the negative phrase or None) of one clause."""
    stripped = clause.strip()
    m = _NEG_OPENING.match(stripped)
    if m is not None:
        return "", stripped[m.end():]
    m = _NEG_ANYWHERE.search(stripped)
    if m is not None:
        return stripped[: m.start()], stripped[m.end():]
    return clause, None


def _take_negatives(text: str, parsed: ParsedPrompt) -> str:
    """`text` without its negative clauses (which go to `parsed.negatives`); unchanged if it has none."""
    parts = _CLAUSE_SPLIT.split(text)
    clauses, seps = parts[0::2], parts[1::2] + [""]
    kept: list[str] = []
    found = False
    for clause, sep in zip(clauses, seps):
        positive, negative = _negative_split(clause)
        if negative is None:
            kept.append(clause + sep)
            continue
        found = True
        negative = _clean(negative)
        if negative:
            parsed.negatives.append(negative)
        else:
            parsed.warnings.append(f"empty negative phrase in {_clean(clause)[:40]!r}; ignored")
        if _clean(positive):
            kept.append(positive.rstrip() + sep)
    if not found:
        return text
    return _clean("".join(kept))


def _next_directive(text: str, pos: int) -> re.Match | None:
    matches = [m for m in (d.search(text, pos) for d in _DIRECTIVES) if m is not None]
    return min(matches, key=lambda m: (m.start(), -m.end())) if matches else None


def _take_directives(text: str, parsed: ParsedPrompt) -> str:
    """`text` before its first time directive; each directive (to the next one) goes to `parsed.directives`."""
    m = _next_directive(text, 0)
    if m is None:
        return text
    head = text[: m.start()]
    while m is not None:
        nxt = _next_directive(text, m.end())
        body = text[m.end(): nxt.start() if nxt is not None else len(text)]
        time_s = float(m.group(1))
        body = _clean(_take_negatives(body, parsed))
        if body:
            parsed.directives.append(Directive(time_s, body))
        else:
            parsed.warnings.append(f"empty value: the directive at {time_s:g}s says nothing to show; ignored")
        m = nxt
    return _clean(head)


def _take(text: str, parsed: ParsedPrompt) -> str:
    """A piece of text with its directives and negative phrases taken out (unchanged if it has neither)."""
    return _take_negatives(_take_directives(text, parsed), parsed)


def _normal_key(key: str) -> str:
    return re.sub(r"[\s_-]+", " ", key.strip().lower())


def parse_prompt(text: str) -> ParsedPrompt:
    """Read a prompt into fields, negative phrases and time directives.

    Free text with no negatives or directives comes back unchanged as its only `free_text`.
    Never raises: unknown keys, empty values and text without words are warnings.
    """
    parsed = ParsedPrompt(text=text)
    segments = [s for s in _SEGMENT_SPLIT.split(text) if s is not None]
    keyed = [(_KEY_VALUE.match(s), s) for s in segments]
    known = sum(1 for m, _ in keyed if m is not None and _normal_key(m.group(1)) in KEY_TO_FIELD)
    parsed.structured = known > 0 or sum(1 for m, _ in keyed if m is not None) >= 2
    if not parsed.structured:
        rest = _take(text, parsed)
        if _WORD.search(rest):
            parsed.free_text.append(rest if rest is text else _clean(rest))
        _check_words(parsed)
        return parsed
    for m, segment in keyed:
        if not segment.strip(_STRIP):
            continue
        opening = _next_directive(segment, 0)
        if m is None or (opening is not None and opening.start() == 0):  # free text, or `第6秒: …`
            rest = _clean(_take(segment, parsed))
            if rest:
                parsed.free_text.append(rest)
            continue
        key, value = m.group(1).strip(), m.group(2)
        name = KEY_TO_FIELD.get(_normal_key(key))
        if not value.strip(_STRIP):
            parsed.warnings.append(f"empty value for key {key!r}; ignored")
            continue
        if name == "negative":
            parsed.negatives += [n for n in (_clean(v) for v in re.split(r"[,，、]", value)) if n]
            continue
        value = _clean(_take(value, parsed))
        if not value:
            continue
        if name is None:
            parsed.warnings.append(f"unknown key {key!r}; its text is kept in the prompt as written")
            parsed.unknown_keys[key] = value
            parsed.free_text.append(f"{key}{'：' if has_cjk(key) else ': '}{value}")
        elif name in parsed.fields:
            parsed.fields[name] += ("，" if has_cjk(value) else ", ") + value
        else:
            parsed.fields[name] = value
    _check_words(parsed)
    return parsed


def _check_words(parsed: ParsedPrompt) -> None:
    if any(_WORD.search(v) for v in [*parsed.fields.values(), *parsed.free_text]):
        return
    if _WORD.search(parsed.text):
        parsed.warnings.append("the prompt has nothing to show at the start "
                               "(only negative phrases or time directives)")
    else:
        parsed.warnings.append("the prompt has no words (only separators or symbols); nothing to condition on")
