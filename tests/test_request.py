"""Request validation: every field's bounds, the error shape, and the exported JSON Schema."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vidgen_serve.errors import InvalidRequest
from vidgen_serve.request import (
    HARD_MAX_DURATION_S,
    MAX_KEYFRAMES,
    MAX_PROMPT_CHARS,
    VideoRequest,
    parse_request,
    request_schema,
    schema_json,
)

BASE = {"prompt": "a cat"}

# (field, value that is valid at the edge, value just outside, allowed-range text in the error)
NUMERIC_BOUNDS = [
    ("duration", 1, 0.99, "1..120.0"),
    ("duration", HARD_MAX_DURATION_S, HARD_MAX_DURATION_S + 0.01, "1..120.0"),
    ("fps", 15, 14, "15..60"),
    ("fps", 60, 61, "15..60"),
    ("motion_intensity", 0.1, 0.09, "0.1..1.5"),
    ("motion_intensity", 1.5, 1.51, "0.1..1.5"),
    ("temporal_consistency", 0.7, 0.69, "0.7..1.0"),
    ("temporal_consistency", 1.0, 1.01, "0.7..1.0"),
    ("seed", 0, -1, "0..9223372036854775807"),
    ("seed", 2**63 - 1, 2**63, "0..9223372036854775807"),
    ("num_inference_steps", 1, 0, "1..200"),
    ("num_inference_steps", 200, 201, "1..200"),
    ("guidance_scale", 1.0, 0.99, "1.0..30.0"),
    ("guidance_scale", 30.0, 30.01, "1.0..30.0"),
]

ENUMS = {
    "resolution": ["480p", "720p", "1080p", "4k"],
    "aspect": ["16:9", "9:16", "1:1"],
    "color_palette": ["warm", "cool", "neutral"],
    "camera_motion": ["static", "pan", "zoom"],
}


def invalid(body: dict) -> list[dict]:
    with pytest.raises(InvalidRequest) as info:
        parse_request(body)
    assert info.value.status_code == 422
    return info.value.details


def only_error(body: dict) -> dict:
    details = invalid(body)
    assert len(details) == 1, details
    return details[0]


@pytest.mark.parametrize("field,edge,outside,allowed", NUMERIC_BOUNDS)
def test_numeric_bounds(field, edge, outside, allowed):
    assert getattr(parse_request({**BASE, field: edge}), field) == edge
    err = only_error({**BASE, field: outside})
    assert err["field"] == field
    assert err["value"] == outside
    assert err["allowed"] == allowed
    assert "than or equal to" in err["message"]


@pytest.mark.parametrize("field,values", sorted(ENUMS.items()))
def test_enum_fields(field, values):
    for value in values:
        assert getattr(parse_request({**BASE, field: value}), field) == value
    err = only_error({**BASE, field: "bogus"})
    assert err == {"field": field, "value": "bogus", "message": err["message"], "allowed": values}
    # Enums are exact: a different case is a different value.
    assert only_error({**BASE, field: values[0].upper() + "X"})["field"] == field


@pytest.mark.parametrize("field,limit", [("prompt", MAX_PROMPT_CHARS), ("negative_prompt", MAX_PROMPT_CHARS),
                                         ("style", 64)])
def test_string_lengths(field, limit):
    assert len(getattr(parse_request({**BASE, field: "x" * limit}), field)) == limit
    err = only_error({**BASE, field: "x" * (limit + 1)})
    assert err["field"] == field
    assert err["allowed"].endswith(f"..{limit}")
    if limit > 200:  # long input is not echoed back in full
        assert err["value"].endswith("…") and len(err["value"]) == 201
    else:
        assert err["value"] == "x" * (limit + 1)


@pytest.mark.parametrize("field", ["prompt", "style"])
def test_empty_strings_rejected(field):
    err = only_error({**BASE, field: ""})
    assert err["field"] == field
    assert err["allowed"] == f"length 1..{MAX_PROMPT_CHARS if field == 'prompt' else 64}"


def test_prompt_is_required():
    err = only_error({})
    assert err["field"] == "prompt"
    assert "required" in err["message"].lower()


def test_wrong_type_names_field_and_range():
    err = only_error({**BASE, "fps": "fast"})
    assert (err["field"], err["value"], err["allowed"]) == ("fps", "fast", "15..60")


def test_unknown_field_lists_the_known_ones():
    err = only_error({**BASE, "lenght": 5})
    assert err["field"] == "lenght"
    assert err["message"] == "unknown field"
    assert err["allowed"] == sorted(request_schema()["properties"])
    assert "duration" in err["allowed"]


def test_several_errors_are_all_reported():
    details = invalid({**BASE, "fps": 100, "aspect": "4:3", "motion_intensity": 9})
    assert {d["field"] for d in details} == {"fps", "aspect", "motion_intensity"}
    message = str(InvalidRequest(details))
    assert "fps" in message and "aspect" in message and "motion_intensity" in message


def test_keyframe_past_duration_names_the_keyframe():
    body = {**BASE, "duration": 3, "keyframes": [{"time_s": 1, "prompt": "b"}, {"time_s": 4, "prompt": "c"}]}
    err = only_error(body)
    assert err["field"] == "keyframes.1.time_s"
    assert err["value"] == 4
    assert err["allowed"] == "0..3"
    assert "duration" in err["message"]


def test_keyframe_at_duration_is_allowed():
    req = parse_request({**BASE, "duration": 3, "keyframes": [{"time_s": 0, "prompt": "b"}, {"time_s": 3, "prompt": "c"}]})
    assert [k.time_s for k in req.keyframes] == [0, 3]


def test_keyframe_fields():
    err = only_error({**BASE, "keyframes": [{"time_s": -0.5, "prompt": "b"}]})
    assert (err["field"], err["value"], err["allowed"]) == ("keyframes.0.time_s", -0.5, "0..120.0")
    err = only_error({**BASE, "keyframes": [{"time_s": 1, "prompt": ""}]})
    assert (err["field"], err["allowed"]) == ("keyframes.0.prompt", f"length 1..{MAX_PROMPT_CHARS}")
    err = only_error({**BASE, "keyframes": [{"time_s": 1, "prompt": "b", "weight": 2}]})
    assert (err["field"], err["message"], err["allowed"]) == ("keyframes.0.weight", "unknown field", ["prompt", "time_s"])


def test_too_many_keyframes():
    kfs = [{"time_s": 1, "prompt": "b"}] * (MAX_KEYFRAMES + 1)
    err = only_error({**BASE, "keyframes": kfs})
    assert err["field"] == "keyframes"
    assert err["allowed"] == f"0..{MAX_KEYFRAMES} items"
    assert len(parse_request({**BASE, "keyframes": kfs[:MAX_KEYFRAMES]}).keyframes) == MAX_KEYFRAMES


def test_defaults():
    req = parse_request(BASE)
    assert (req.style, req.duration, req.fps, req.resolution, req.aspect) == ("realistic", 5.0, 30, "720p", "16:9")
    assert (req.motion_intensity, req.temporal_consistency, req.seed) == (1.0, 0.85, None)


def test_json_text_is_parsed_and_bad_json_is_invalid_request():
    assert parse_request(json.dumps({**BASE, "fps": 24})).fps == 24
    err = only_error('{"prompt": ')
    assert err["field"] == "body"
    assert only_error(json.dumps({**BASE, "fps": 10}))["field"] == "fps"


def test_error_message_names_field_value_and_range():
    with pytest.raises(InvalidRequest) as info:
        parse_request({**BASE, "duration": 500})
    assert "duration" in info.value.message
    assert info.value.details[0]["value"] == 500


# --- JSON Schema -------------------------------------------------------------------


def _field(schema: dict, name: str) -> dict:
    """The non-null branch of a property (optional fields are anyOf [..., null])."""
    prop = schema["properties"][name]
    for option in prop.get("anyOf", []):
        if option.get("type") != "null":
            return option
    return prop


def _check_schema_bounds(schema: dict, max_duration: float = HARD_MAX_DURATION_S) -> None:
    """`max_duration`: the static hard limit, or the profile's for a profile-bounded schema."""
    assert schema["additionalProperties"] is False
    assert schema["required"] == ["prompt"]
    for field, edge, _outside, _allowed in NUMERIC_BOUNDS:
        node = _field(schema, field)
        assert "minimum" in node and "maximum" in node, field
        assert node["minimum"] <= min(edge, max_duration if field == "duration" else edge) <= node["maximum"]
    assert (_field(schema, "fps")["minimum"], _field(schema, "fps")["maximum"]) == (15, 60)
    assert (_field(schema, "duration")["minimum"], _field(schema, "duration")["maximum"]) == (1, max_duration)
    for field, values in ENUMS.items():
        assert _field(schema, field)["enum"] == values
    for field, limit in [("prompt", MAX_PROMPT_CHARS), ("negative_prompt", MAX_PROMPT_CHARS), ("style", 64)]:
        assert _field(schema, field)["maxLength"] == limit
    assert _field(schema, "keyframes")["maxItems"] == MAX_KEYFRAMES
    kf = schema["$defs"]["Keyframe"]
    assert kf["properties"]["time_s"]["minimum"] == 0
    assert kf["properties"]["time_s"]["maximum"] == max_duration
    assert kf["properties"]["prompt"]["minLength"] == 1
    # Every request field is described in the schema.
    assert set(schema["properties"]) == set(VideoRequest.model_fields)
    assert all(schema["properties"][f].get("description") for f in schema["properties"])


def test_request_schema_has_every_bound():
    _check_schema_bounds(request_schema())
    assert json.loads(schema_json()) == request_schema()


def test_cli_schema_output_has_every_bound():
    proc = subprocess.run([sys.executable, "-m", "vidgen_serve.cli", "schema"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    _check_schema_bounds(json.loads(proc.stdout), max_duration=30)  # bounded by the default (tiny) profile


def test_errors_survive_pickling_with_their_status_and_details():
    """Stage replicas raise these; Ray pickles them back to the ingress."""
    import pickle

    from vidgen_serve.errors import GenerationCancelled, InvalidRequest, VidgenError, field_error

    for error in (VidgenError(503, "busy", code="overloaded", headers={"Retry-After": "5"}),
                  InvalidRequest([field_error("fps", 90, "too high", "15..60")]),
                  GenerationCancelled("cancelled at step 2/4")):
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error)
        assert (copy.status_code, copy.message, copy.code, copy.details, copy.headers) == (
            error.status_code, error.message, error.code, error.details, error.headers)
        assert str(copy) == str(error)


# --- limits from the active profile, values as JSON, fields not applied yet ------------


def test_profile_bounds_the_published_duration_and_names_it_in_errors():
    from vidgen_serve.config import AppConfig

    profile = AppConfig().model_profile  # tiny: up to 30 s
    schema = request_schema(profile)
    duration = _field(schema, "duration")
    assert (duration["minimum"], duration["maximum"]) == (1, profile.max_duration_s) == (1, 30)
    assert "1..30" in duration["description"] and "120" not in duration["description"]
    assert "15" not in duration["description"]  # no claim about a native length
    assert schema["$defs"]["Keyframe"]["properties"]["time_s"]["maximum"] == 30
    assert request_schema() is request_schema() and request_schema(profile) is request_schema(profile)  # cached
    for value in (0, 0.5, 500):
        with pytest.raises(InvalidRequest) as info:
            parse_request({**BASE, "duration": value}, profile)
        (err,) = info.value.details
        assert (err["field"], err["value"], err["allowed"]) == ("duration", value, "1..30")
    assert "tiny" in only_error_with(profile, {**BASE, "duration": 500})["message"]


def only_error_with(profile, body: dict) -> dict:
    with pytest.raises(InvalidRequest) as info:
        parse_request(body, profile)
    assert len(info.value.details) == 1
    return info.value.details[0]


def test_bad_values_are_echoed_as_json_not_as_python():
    err = only_error({})  # prompt missing: the "input" is the whole body, not the field's
    assert err["field"] == "prompt" and err["value"] is None
    err = only_error({**BASE, "fps": {"a": [1, 2]}})
    assert err["value"] == {"a": [1, 2]}  # a JSON object, not "{'a': [1, 2]}"
    json.dumps(err, allow_nan=False)
    err = only_error({**BASE, "fps": {"k": "v" * 300}})
    assert isinstance(err["value"], str) and err["value"].startswith('{"k": "vvv') and err["value"].endswith("…")


def test_not_yet_applied_lists_only_the_fields_set():
    from vidgen_serve.request import not_yet_applied

    assert not_yet_applied(parse_request(BASE)) == []
    assert not_yet_applied(parse_request({**BASE, "color_palette": "neutral", "motion_intensity": 1.0})) == []
    warned = not_yet_applied(parse_request({**BASE, "motion_intensity": 0.5, "camera_motion": "zoom",
                                            "keyframes": [{"time_s": 1, "prompt": "b"}],
                                            "temporal_consistency": 0.9}))
    # every control is applied now (tests/media/test_controls.py, tests/pipeline/test_keyframes.py)
    assert warned == []
