"""Prompt understanding: a table of Chinese and English prompts (malformed ones included) with
the exact fields, negatives, time directives and warnings each one gives; then composition,
style selection, keyframe merging and the control descriptors."""

from __future__ import annotations

import random

import pytest

from vidgen_serve.config import DEFAULT_STYLES
from vidgen_serve.prompting import build_schedule, compose, descriptors, parse_prompt, style_preset_for
from vidgen_serve.request import VideoRequest

WARNING_KINDS = {
    "unknown key": "unknown_key",
    "empty value": "empty_value",
    "empty negative": "empty_negative",
    "the prompt has nothing to show": "nothing_to_show",
    "the prompt has no words": "no_words",
}


def kinds(warnings: list[str]) -> list[str]:
    out = []
    for w in warnings:
        found = [kind for prefix, kind in WARNING_KINDS.items() if w.startswith(prefix)]
        assert len(found) == 1, w
        out += found
    return out


PANDA = {"subject": "熊猫", "action": "吃竹子", "scene": "竹林"}
PANDA_EN = {"subject": "panda", "action": "eating bamboo", "scene": "bamboo forest"}

# (prompt, fields, unknown keys, free text, negatives, directives, warning kinds)
TABLE = [
    ("主体:熊猫;动作:吃竹子;场景:竹林;风格:3D动画", {**PANDA, "style": "3D动画"}, {}, [], [], [], []),
    ("主体：熊猫；动作：吃竹子；场景：竹林；风格：3D动画", {**PANDA, "style": "3D动画"}, {}, [], [], [], []),
    ("主体：熊猫，动作：吃竹子，场景：竹林", PANDA, {}, [], [], [], []),
    ("主体:熊猫\n动作:吃竹子\n场景:竹林", PANDA, {}, [], [], [], []),
    ("subject: panda; action: eating bamboo; scene: bamboo forest; style: 3D animation",
     {**PANDA_EN, "style": "3D animation"}, {}, [], [], [], []),
    ("Subject: panda, Action: eating bamboo, Scene: bamboo forest", PANDA_EN, {}, [], [], [], []),
    ("subject: panda\naction: eating bamboo\nlighting: golden hour\ncamera: close-up",
     {"subject": "panda", "action": "eating bamboo", "lighting": "golden hour", "camera": "close-up"}, {}, [], [], [],
     []),
    ("主体:熊猫;光线:柔和的晨光;镜头:特写;氛围:宁静",
     {"subject": "熊猫", "lighting": "柔和的晨光", "camera": "特写", "mood": "宁静"}, {}, [], [], [], []),
    ("SUBJECT: Panda; STYLE: Anime", {"subject": "Panda", "style": "Anime"}, {}, [], [], [], []),
    ("主体:熊猫;主体:小熊猫", {"subject": "熊猫，小熊猫"}, {}, [], [], [], []),
    # malformed structured prompts
    ("主体:熊猫;天气:晴朗", {"subject": "熊猫"}, {"天气": "晴朗"}, ["天气：晴朗"], [], [], ["unknown_key"]),
    ("subject: fox; weather: snowy", {"subject": "fox"}, {"weather": "snowy"}, ["weather: snowy"], [], [],
     ["unknown_key"]),
    ("主体:;动作:跑", {"action": "跑"}, {}, [], [], [], ["empty_value"]),
    ("subject: ; action: running", {"action": "running"}, {}, [], [], [], ["empty_value"]),
    ("主体：；动作：", {}, {}, [], [], [], ["empty_value", "empty_value", "nothing_to_show"]),
    # negative phrases
    ("主体:熊猫;不要出现人类角色", {"subject": "熊猫"}, {}, [], ["人类角色"], [], []),
    ("一只熊猫在竹林里吃竹子，不要出现人类角色", {}, {}, ["一只熊猫在竹林里吃竹子"], ["人类角色"], [], []),
    ("一只熊猫在竹林里吃竹子，没有汽车，不含文字", {}, {}, ["一只熊猫在竹林里吃竹子"], ["汽车", "文字"], [], []),
    ("a panda eating bamboo, no humans", {}, {}, ["a panda eating bamboo"], ["humans"], [], []),
    ("a fox running without snow", {}, {}, ["a fox running"], ["snow"], [], []),
    ("a quiet lake, avoid blur, avoid text", {}, {}, ["a quiet lake"], ["blur", "text"], [], []),
    ("a lighthouse. Do not show boats.", {}, {}, ["a lighthouse"], ["boats"], [], []),
    ("negative: humans, text; subject: dog", {"subject": "dog"}, {}, [], ["humans", "text"], [], []),
    ("负面：模糊，低质量；主体：熊猫", {"subject": "熊猫"}, {}, [], ["模糊", "低质量"], [], []),
    ("no humans", {}, {}, [], ["humans"], [], ["nothing_to_show"]),
    ("不要", {}, {}, [], [], [], ["empty_negative", "nothing_to_show"]),
    # time directives
    ("一只熊猫在竹林里吃竹子，第3秒出现彩虹", {}, {}, ["一只熊猫在竹林里吃竹子"], [], [(3.0, "出现彩虹")], []),
    ("小猫在草地上玩耍，3秒时下起小雨", {}, {}, ["小猫在草地上玩耍"], [], [(3.0, "下起小雨")], []),
    ("熊猫吃竹子，5秒后熊猫睡着了", {}, {}, ["熊猫吃竹子"], [], [(5.0, "熊猫睡着了")], []),
    ("a red fox in snow. at 3s: a rainbow appears", {}, {}, ["a red fox in snow"], [], [(3.0, "a rainbow appears")],
     []),
    ("a city street, after 5 seconds it starts raining", {}, {}, ["a city street"], [],
     [(5.0, "it starts raining")], []),
    ("a beach at sunset, at 2.5 s, a dolphin jumps", {}, {}, ["a beach at sunset"], [], [(2.5, "a dolphin jumps")],
     []),
    ("主体:熊猫;场景:竹林;第6秒:出现彩虹", {"subject": "熊猫", "scene": "竹林"}, {}, [], [], [(6.0, "出现彩虹")], []),
    ("a cat; at 2s: a dog arrives; at 4s: they play", {}, {}, ["a cat"], [],
     [(2.0, "a dog arrives"), (4.0, "they play")], []),
    ("熊猫在雪地里，第2秒开始下雪，不要出现人类", {}, {}, ["熊猫在雪地里"], ["人类"], [(2.0, "下雪")], []),
    ("第3秒", {}, {}, [], [], [], ["empty_value", "nothing_to_show"]),
    # free text stays exactly as written
    ("a cat", {}, {}, ["a cat"], [], [], []),
    ("一只橘猫在樱花树下追逐蝴蝶", {}, {}, ["一只橘猫在樱花树下追逐蝴蝶"], [], [], []),
    ("  A  cat,   on a mat.  ", {}, {}, ["  A  cat,   on a mat.  "], [], [], []),
    ("a panda; note: keep it cute", {}, {}, ["a panda; note: keep it cute"], [], [], []),
    ("the 1990s: a retro arcade", {}, {}, ["the 1990s: a retro arcade"], [], [], []),
    # garbage
    (";" * 2000, {}, {}, [], [], [], ["no_words"]),
    ("；；；：：：，，，" * 200, {}, {}, [], [], [], ["no_words"]),
    ("#$%^&*" * 300, {}, {}, [], [], [], ["no_words"]),
    ("\n\n\n   \t", {}, {}, [], [], [], ["no_words"]),
]


@pytest.mark.parametrize("text,fields,unknown,free,negatives,directives,warned", TABLE,
                         ids=[f"{i}:{row[0][:24]!r}" for i, row in enumerate(TABLE)])
def test_prompt_table(text, fields, unknown, free, negatives, directives, warned):
    parsed = parse_prompt(text)
    assert parsed.fields == fields
    assert parsed.unknown_keys == unknown
    assert parsed.free_text == free
    assert parsed.negatives == negatives
    assert [(d.time_s, d.text) for d in parsed.directives] == directives
    assert kinds(parsed.warnings) == warned


def test_table_is_large_and_bilingual():
    assert len(TABLE) >= 30
    assert sum(any("\u4e00" <= c <= "\u9fff" for c in row[0]) for row in TABLE) >= 12


def test_random_text_never_raises():
    rng = random.Random(0)
    alphabet = list("主体动作场景风格不要没有第秒时后:：;；,，。.\n abcsnoat0123456789#-")
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 300)))
        parsed = parse_prompt(text)
        schedule = build_schedule(VideoRequest(prompt=text, duration=5), DEFAULT_STYLES)
        assert schedule.prompts and all(isinstance(p, str) for p in schedule.prompts)
        assert isinstance(parsed.warnings, list)


@pytest.mark.parametrize("text,expected", [
    ("主体:熊猫;动作:吃竹子;场景:竹林", "熊猫在竹林中吃竹子"),
    ("subject: panda; action: eating bamboo; scene: bamboo forest", "panda eating bamboo in bamboo forest"),
    ("subject: a panda; scene: on a hill; lighting: golden hour", "a panda on a hill, golden hour"),
    ("主体:熊猫;动作:吃竹子;光线:晨光;风格:水彩", "熊猫吃竹子，水彩，晨光"),
    ("场景:竹林", "竹林"),
    ("a cat, no dogs", "a cat"),
])
def test_compose(text, expected):
    assert compose(parse_prompt(text)) == expected


@pytest.mark.parametrize("value,preset", [
    ("3D动画", "3d-animation"), ("3D Animation", "3d-animation"), ("3d-animation", "3d-animation"),
    ("动漫", "anime"), ("动画", "anime"), ("Anime", "anime"), ("写实", "realistic"), ("realistic", "realistic"),
    ("水墨", "ink-wash"), ("水墨画", "ink-wash"), ("ink wash", "ink-wash"), ("水墨风格", "ink-wash"),
    ("电影", "cinematic"), ("电影感", "cinematic"), ("Cinematic", "cinematic"), ("水彩", None), ("", None),
])
def test_style_aliases(value, preset):
    assert style_preset_for(value, DEFAULT_STYLES) == preset


def test_style_field_picks_the_preset_unless_the_request_sets_one():
    text = "主体:熊猫;动作:吃竹子;场景:竹林;风格:3D动画"
    picked = build_schedule(VideoRequest(prompt=text), DEFAULT_STYLES)
    template = DEFAULT_STYLES["3d-animation"].prompt_template
    assert picked.style == "3d-animation" and picked.warnings == []
    assert picked.prompts == [template.format(prompt="熊猫在竹林中吃竹子")]  # the style's text is the template's
    assert picked.negative_prompt == DEFAULT_STYLES["3d-animation"].negative_template
    explicit = build_schedule(VideoRequest(prompt=text, style="anime"), DEFAULT_STYLES)
    assert explicit.style == "anime"
    assert len(explicit.warnings) == 1 and explicit.warnings[0].startswith("style conflict")
    same = build_schedule(VideoRequest(prompt=text, style="3d-animation"), DEFAULT_STYLES)
    assert same.style == "3d-animation" and same.warnings == []
    # The default value, set explicitly, is still the request's choice.
    default = build_schedule(VideoRequest(prompt=text, style="realistic"), DEFAULT_STYLES)
    assert default.style == "realistic" and default.warnings[0].startswith("style conflict")


def test_negatives_join_the_users_and_the_styles():
    s = build_schedule(VideoRequest(prompt="一只熊猫在竹林里吃竹子，不要出现人类角色，no cars", negative_prompt="blur",
                                    style="anime"), DEFAULT_STYLES)
    assert s.negative_prompt == "blur, 人类角色, cars, " + DEFAULT_STYLES["anime"].negative_template
    assert s.prompts == [DEFAULT_STYLES["anime"].prompt_template.format(prompt="一只熊猫在竹林里吃竹子")]


def test_directives_become_keyframes_merged_with_the_requests():
    request = VideoRequest(prompt="a red fox in snow. at 3s: a rainbow appears. at 6s: night falls. at 9s: dawn",
                           duration=8, keyframes=[{"time_s": 6, "prompt": "the fox sleeps"},
                                                  {"time_s": 1, "prompt": "the fox runs"}])
    s = build_schedule(request, DEFAULT_STYLES)
    assert [(k.time_s, k.text, k.source) for k in s.keyframes] == [
        (1.0, "the fox runs", "request"),
        (3.0, "a red fox in snow, a rainbow appears", "prompt"),
        (6.0, "the fox sleeps", "request"),
    ]
    warned = " | ".join(s.warnings)
    assert "9s is past the video's duration (8s); dropped" in warned
    assert "directive at 6s is replaced by the request's keyframe" in warned
    assert len(s.warnings) == 2
    template = DEFAULT_STYLES["realistic"].prompt_template
    assert s.prompts == [template.format(prompt=t) for t in
                         ("a red fox in snow", "the fox runs", "a red fox in snow, a rainbow appears",
                          "the fox sleeps")]
    assert [k.prompt_index for k in s.keyframes] == [1, 2, 3]
    assert s.times() == [(0.0, 0), (1.0, 1), (3.0, 2), (6.0, 3)]


def test_the_same_text_twice_is_one_prompt():
    s = build_schedule(VideoRequest(prompt="a cat", keyframes=[{"time_s": 2, "prompt": "a dog"},
                                                              {"time_s": 4, "prompt": "a cat"}]), DEFAULT_STYLES)
    assert len(s.prompts) == 2 and [k.prompt_index for k in s.keyframes] == [1, 0]


@pytest.mark.parametrize("motion,palette,camera,expected", [
    (1.0, "neutral", None, []),
    (0.1, "neutral", None, ["slow, subtle motion"]),
    (0.39, "warm", None, ["slow, subtle motion", "warm color palette, golden tones"]),
    (0.4, "cool", None, ["cool color palette, blue tones"]),
    (1.2, "neutral", "pan", ["camera pans horizontally"]),
    (1.5, "neutral", "zoom", ["fast, dynamic motion", "camera slowly zooms in"]),
    (1.0, "neutral", "static", ["static camera"]),
])
def test_descriptors(motion, palette, camera, expected):
    assert descriptors(motion, palette, camera) == expected


def test_descriptors_follow_the_style_template():
    template = DEFAULT_STYLES["cinematic"].prompt_template
    s = build_schedule(VideoRequest(prompt="a cat", style="cinematic", motion_intensity=0.2, color_palette="cool",
                                    camera_motion="static"), DEFAULT_STYLES)
    assert s.prompts == [template.format(prompt="a cat") + ", slow, subtle motion, cool color palette, blue tones, "
                                                           "static camera"]
    # camera_motion left at its default asks for nothing: the plain prompt is unchanged.
    assert build_schedule(VideoRequest(prompt="a cat"), DEFAULT_STYLES).prompts == [
        DEFAULT_STYLES["realistic"].prompt_template.format(prompt="a cat")]


def test_a_prompt_with_no_words_still_has_a_prompt():
    s = build_schedule(VideoRequest(prompt=";" * 2000), DEFAULT_STYLES)
    assert s.prompts == ["photorealistic, natural lighting, highly detailed"]
    assert any("no words" in w for w in s.warnings)


@pytest.mark.parametrize("text,directives", [
    ("3s: a bird", [(3.0, "a bird")]),
    ("a tree; 4 sec: leaves fall", [(4.0, "leaves fall")]),
    ("the 1990s: a retro arcade", []),
    ("90s style; 2s: rain", [(2.0, "rain")]),
])
def test_bare_second_marks(text, directives):
    assert [(d.time_s, d.text) for d in parse_prompt(text).directives] == directives
