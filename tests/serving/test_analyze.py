"""`POST /v1/prompt/analyze` and `vidgen-serve analyze` return the same document for the same
input. The HTTP side is the real app and routes in process (tests/serving/fake_handles.py) with
the text encoder's token counting done by the real `TextEncoder` stage on the tiny checkpoint."""

from __future__ import annotations

import asyncio
import json

import pytest
from fake_handles import ingress_app

from vidgen_serve.cli import main
from vidgen_serve.serving.settings import ServeSettings

KEY = "k-analyze"
AUTH = {"Authorization": f"Bearer {KEY}"}
SEPARATORS = "；;:：，,\n" * 285  # 1,995 characters of separators


@pytest.fixture(autouse=True)
def _keys(monkeypatch):
    monkeypatch.setenv("VIDGEN_API_KEYS", KEY)


@pytest.fixture(scope="module")
def encoder(tiny_config, checkpoint):
    from vidgen_serve.pipeline import TextEncoder

    return TextEncoder(tiny_config, checkpoint)


def post_all(tmp_path, encoder, bodies: list) -> list:
    """POST each body to /v1/prompt/analyze; (status, json) of each."""

    async def count_tokens(texts):  # what TextEncoderDeployment.count_tokens returns
        return {"tokens": [encoder.count_tokens(t) for t in texts], "limit": encoder.max_sequence_length}

    async def run():
        out = []
        async with ingress_app(ServeSettings(state_dir=tmp_path), count_tokens=count_tokens) as (client, _):
            for body in bodies:
                r = await client.post("/v1/prompt/analyze", json=body, headers=AUTH)
                out.append((r.status_code, r.json()))
        return out

    return asyncio.run(run())


def cli(capsys, *args) -> tuple[int, dict | str]:
    code = main(["analyze", *args])
    captured = capsys.readouterr()
    return code, (json.loads(captured.out) if code == 0 else captured.err)


CASES = [
    ("主体:熊猫;动作:吃竹子;场景:竹林;风格:3D动画;不要出现人类角色;第6秒出现彩虹", {"duration": 12}),
    ("a red fox in snow, no humans. at 3s: a rainbow appears", {"duration": 5, "style": "anime"}),
    ("subject: panda; style: ink wash; weather: foggy; 主体:", {"duration": 2}),
    ("a very long prompt " * 40, {}),
    (SEPARATORS, {}),
]


def test_cli_and_http_give_the_same_document(tmp_path, encoder, capsys):
    bodies = [{"prompt": prompt, **extra} for prompt, extra in CASES]
    answers = post_all(tmp_path, encoder, bodies)
    for (prompt, extra), (status, doc) in zip(CASES, answers):
        assert status == 200, doc
        flags = [f for k, v in extra.items() for f in (f"--{k}", str(v))]
        code, printed = cli(capsys, prompt, *flags)
        assert code == 0, printed
        assert printed == doc
    panda, fox, mixed, long, separators = (doc for _, doc in answers)
    # the panda: parse, style from the prompt, negatives, keyframe schedule per window
    assert panda["parse"]["fields"] == {"subject": "熊猫", "action": "吃竹子", "scene": "竹林", "style": "3D动画"}
    assert panda["style"] == "3d-animation" and panda["negative_prompt"].startswith("人类角色, ")
    assert [k["time_s"] for k in panda["keyframes"]] == [6.0] and len(panda["prompts"]) == 2
    assert [w["latent_frames"] for w in panda["windows"]] == [[0, 11], [7, 18], [14, 25]]
    assert [[p["prompt"] for p in w["prompt_weights"]] for w in panda["windows"]] == [[0], [0, 1], [1]]
    assert panda["windows"][0]["seconds"][0] == 0 and panda["windows"][-1]["seconds"][1] == 12
    assert panda["tokens"]["limit"] == 64 and len(panda["tokens"]["prompts"]) == 2
    assert panda["warnings"] == [] and panda["truncated"] is False
    # the fox: an explicit style; the directive's keyframe; negative phrase moved out
    assert fox["style"] == "anime" and fox["parse"]["negatives"] == ["humans"]
    assert fox["keyframes"][0]["text"] == "a red fox in snow, a rainbow appears"
    # malformed: unknown key, empty value, style named in the prompt
    assert mixed["parse"]["unknown_keys"] == {"weather": "foggy"} and mixed["style"] == "ink-wash"
    assert any(w.startswith("unknown key 'weather'") for w in mixed["warnings"])
    assert any(w.startswith("empty value for key '主体'") for w in mixed["warnings"])
    # over the encoder's limit: counted, flagged
    assert long["tokens"]["prompt"] > 64 and long["truncated"] is True
    assert any(w.startswith("prompt is") and "64" in w for w in long["warnings"])
    # 2,000 characters of separators: a 200 and a warning
    assert any("no words" in w for w in separators["warnings"])


def test_bad_input_is_a_422_naming_the_field_never_a_5xx(tmp_path, encoder):
    bodies = [
        {"prompt": "x" * 2001},
        {"prompt": "a cat", "fps": 30},
        {"prompt": "a cat", "style": "nope"},
        {"prompt": "a cat", "duration": 3, "keyframes": [{"time_s": 5, "prompt": "a dog"}]},
        {"prompt": "a cat", "duration": 99},
        {"prompt": "a cat at 9s: a dog", "duration": 3},
        {"prompt": "第99999秒出现彩虹；主体：；：：：；no；without；avoid；不要；没有", "duration": 1},
        {"prompt": "\u0000\u200b\ufeff" * 600},
        {"prompt": "🙂" * 2000},
    ]
    answers = post_all(tmp_path, encoder, bodies)
    fields = [[d["field"] for d in doc["error"]["details"]] if status == 422 else status for status, doc in answers]
    assert fields == [["prompt"], ["fps"], ["style"], ["keyframes.0.time_s"], ["duration"], 200, 200, 200, 200]
    past = answers[5][1]
    assert past["keyframes"] == [] and any("past the video's duration" in w for w in past["warnings"])


def test_cli_analyze_errors_name_the_field(capsys):
    code, err = cli(capsys, "a cat", "--style", "nope")
    assert code == 2 and "style='nope'" in err and "realistic" in err
    code, err = cli(capsys, "a cat", "--duration", "0")
    assert code == 2 and "duration=0.0" in err


def test_a_generation_reports_the_prompts_warnings(tmp_path):
    body = {"prompt": "subject: fox; weather: snowy; at 9s: night", "duration": 2, "resolution": "480p",
            "keyframes": [{"time_s": 1, "prompt": "a fox asleep"}]}

    async def run():
        async with ingress_app(ServeSettings(state_dir=tmp_path)) as (client, _):
            r = await client.post("/v1/video/jobs", json=body, headers=AUTH)
            return r.status_code, r.headers.get("x-vidgen-warnings", ""), r.json()

    status, header, job = asyncio.run(run())
    assert status == 202, job
    assert "prompt: unknown key 'weather'" in header and "past the video's duration" in header
    assert "keyframes" not in header  # keyframes are applied: no "not applied yet" warning
