"""End-to-end tests of the Ray Serve application over real HTTP (tiny profile, CPU).

One Ray cluster and one application for the whole module (starting them costs tens of
seconds on 2 cores). Tests run in file order: the first group uses the application as
first deployed (a long deadline, so the 8 s 1080p product-guide call fits); the restart
group then does a full restart (`serve.delete` + `serve.run` with the same `state_dir`)
with a short deadline, which is also how the deadline (504) is tested: no fault
injection needed, and no extra replica restarts beyond the one the restart test needs.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from http_summary import summary

from vidgen_serve.front_door import haproxy_binary, ingress_env
from vidgen_serve.net import find_free_port

pytestmark = pytest.mark.slow

APP = "vidgen_test"
API_KEY, OTHER_KEY, ADMIN_KEY = "testkey", "otherkey", "adminkey"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
OTHER_AUTH = {"Authorization": f"Bearer {OTHER_KEY}"}
LONG_DEADLINE_S = 300.0  # the 8 s 1080p product-guide call must fit (504s use X-Vidgen-Timeout)
SMALL = {"prompt": "a red fox running through snow", "duration": 1, "resolution": "480p",
         "num_inference_steps": 2}
PRODUCT_GUIDE = {"prompt": "一只橘猫在樱花树下追逐蝴蝶", "style": "realistic", "duration": 8, "resolution": "1080p"}
STAGES = ("text_encode", "denoise", "vae_decode", "encode", "total")
RETRY_AFTER_S = 7  # not the default: every Retry-After must come from the setting
DECODER_GATE = "vidgen-test-decoder-gate"  # decodes wait at it while a test holds it closed




class _Collector:
    """A tiny OTLP/HTTP trace collector: stores the spans POSTed to /v1/traces."""

    def __init__(self) -> None:
        self.spans: list[dict] = []
        self.lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                try:
                    collector.add(body)
                finally:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/x-protobuf")
                    self.send_header("Content-Length", "0")
                    self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add(self, body: bytes) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        req = ExportTraceServiceRequest.FromString(body)
        with self.lock:
            for rs in req.resource_spans:
                for ss in rs.scope_spans:
                    for span in ss.spans:
                        attrs = {a.key: a.value.string_value or a.value.int_value for a in span.attributes}
                        self.spans.append({"name": span.name, "trace_id": span.trace_id.hex(),
                                           "span_id": span.span_id.hex(), "parent": span.parent_span_id.hex(),
                                           "attributes": attrs})

    def snapshot(self) -> list[dict]:
        with self.lock:
            return list(self.spans)

    def close(self) -> None:
        self.server.shutdown()


class Env:
    """What the tests need to reach the running application."""

    def __init__(self, base_url: str, state_dir: Path, metrics_port: int, collector: _Collector, args: dict,
                 gate):
        self.base_url = base_url
        self.state_dir = state_dir
        self.metrics_port = metrics_port
        self.collector = collector
        self.args = args
        self.gate = gate  # the FaultGate the Decoder's fault injection names
        self.client = httpx.Client(base_url=base_url, timeout=600, trust_env=False)
        self.shared: dict = {}

    def db(self) -> sqlite3.Connection:
        return sqlite3.connect(self.state_dir / "jobs.sqlite3", timeout=30)

    def job_count(self) -> int:
        with self.db() as conn:
            return conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]

    def app(self):
        """The application under test: the Decoder waits at `DECODER_GATE` while it is closed."""
        from vidgen_serve.serve import compose_app

        faults = {"fault_injection": {"hold_at_gate": DECODER_GATE}}
        return compose_app(self.args, {"Decoder": {"user_config": faults}})

    def held_decodes(self, n: int, timeout_s: float = 120) -> None:
        """Wait until `n` decodes wait at the (closed) gate."""
        import ray

        deadline = time.monotonic() + timeout_s
        while (state := ray.get(self.gate.state.remote()))["waiting"] < n:
            assert time.monotonic() < deadline, f"{n} decodes never reached the gate: {state}"
            time.sleep(0.05)


def _wait_ready(client: httpx.Client, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            last = client.get("/readyz", timeout=10)
            if last.status_code == 200:
                return
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.5)
    raise AssertionError(f"/readyz never became 200: {last!r} {getattr(last, 'text', '')}")


@pytest.fixture(scope="module")
def env():
    import ray
    from ray import serve

    from vidgen_serve.serving.faults import start_gate

    # The shipped front door (what `vidgen-serve serve` and k8s/base/env.yaml run): HAProxy in front of the
    # Ingress replica's own HTTP server.
    front_door = ingress_env("haproxy", local=True)
    saved = {k: os.environ.get(k) for k in ("VIDGEN_API_KEYS", "VIDGEN_ADMIN_KEYS", "OTEL_TRACES_EXPORTER",
                                            "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_BSP_SCHEDULE_DELAY", *front_door)}
    collector = _Collector()
    # Replicas inherit this process's environment (Ray is started from here).
    os.environ.update({
        **front_door,
        "VIDGEN_API_KEYS": f"{API_KEY},{OTHER_KEY}",
        "VIDGEN_ADMIN_KEYS": ADMIN_KEY,
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector.port}",
        "OTEL_BSP_SCHEDULE_DELAY": "500",
    })
    metrics_port = find_free_port()
    http_port = find_free_port()
    state_dir = Path(tempfile.mkdtemp(prefix="vidgen-serve-test-"))
    args = {
        "state_dir": str(state_dir),
        "request_timeout_s": LONG_DEADLINE_S,
        "max_inflight_sync": 1,
        "max_running_jobs": 2,
        "max_queued_jobs": 4,
        "job_heartbeat_s": 0.5,
        "max_job_attempts": 2,
        "retry_after_s": RETRY_AFTER_S,
    }
    ray.init(address="local", num_cpus=4, include_dashboard=False, _metrics_export_port=metrics_port,
             _system_config={"metrics_report_interval_ms": 1000}, log_to_driver=False)
    try:
        gate = start_gate(DECODER_GATE)  # open: decodes pass until a test closes it
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        e = Env(f"http://127.0.0.1:{http_port}", state_dir, metrics_port, collector, args, gate)
        serve.run(e.app(), name=APP, route_prefix="/")
        _wait_ready(e.client)
        yield e
        e.client.close()
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            collector.close()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


# ---- helpers ----------------------------------------------------------------------------


def assert_error(resp: httpx.Response, status: int, code: str | None = None) -> dict:
    assert resp.status_code == status, summary(resp)
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"code", "message", "details", "request_id"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["details"], list)
    assert err["request_id"]
    if code is not None:
        assert err["code"] == code, err
    for d in err["details"]:
        assert {"field", "value", "message"} <= set(d), d
    return err


def detail(err: dict, field: str) -> dict:
    matches = [d for d in err["details"] if d["field"] == field]
    assert matches, f"no detail for {field!r}: {err['details']}"
    return matches[0]


def server_timing(resp: httpx.Response) -> dict[str, str]:
    """{name: 'dur=..' or 'desc=..'} from the Server-Timing header."""
    out = {}
    for part in resp.headers["server-timing"].split(","):
        name, _, rest = part.strip().partition(";")
        out[name] = rest
    return out


def decode_frames(data: bytes):
    import av
    import numpy as np

    with tempfile.NamedTemporaryFile(suffix=".mp4") as f:
        f.write(data)
        f.flush()
        with av.open(f.name) as c:
            return np.stack([fr.to_ndarray(format="rgb24") for fr in c.decode(c.streams.video[0])])


def wait_job(env: Env, job_id: str, states=("succeeded", "failed", "cancelled"), timeout_s: float = 240,
             headers=AUTH, seen: list | None = None) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        r = env.client.get(f"/v1/video/jobs/{job_id}", headers=headers)
        assert r.status_code == 200, summary(r)
        job = r.json()
        if seen is not None:
            seen.append(job)
        if job["state"] in states:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} not in {states} after {timeout_s}s: {job}")


def replica_actor_names(deployment: str) -> list[str]:
    import ray

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith(f"SERVE_REPLICA::{APP}#{deployment}#"))


# ---- phase 1: the application as first deployed ------------------------------------------


def test_front_door_is_haproxy(env):
    """The service's port is HAProxy's (it forwards to the Ingress replica's own server), not Serve's proxy."""
    port = env.base_url.rsplit(":", 1)[1]
    configs = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if argv[0] == haproxy_binary() and "-f" in argv:
            configs.append(Path(argv[argv.index("-f") + 1]).read_text())
    assert any(f"bind 127.0.0.1:{port}" in c for c in configs), configs


def test_product_guide_call(env, probe_mp4, tmp_path):
    r = env.client.post("/v1/video/generate", json=PRODUCT_GUIDE, headers=AUTH)
    assert r.status_code == 200, summary(r)
    assert r.headers["content-type"] == "video/mp4"
    assert r.headers.get("x-request-id")
    assert r.headers["x-vidgen-denoiser"] == "primary"
    timing = server_timing(r)
    for stage in STAGES:
        assert timing[stage].startswith("dur="), timing
        assert float(timing[stage][4:]) >= 0
    assert timing["text_cache"] in ('desc="hit"', 'desc="miss"')
    path = tmp_path / "guide.mp4"
    path.write_bytes(r.content)
    info = probe_mp4(path, decode=False)
    assert info["codec"] == "h264"
    assert info["pix_fmt"] == "yuv420p"
    assert (info["width"], info["height"]) == (1920, 1080)
    assert info["fps"] == 30
    import av

    with av.open(str(path)) as c:
        n = sum(1 for _ in c.decode(c.streams.video[0]))
    assert n == 240
    duration = info["duration_s"] or info["container_duration_s"]
    assert abs(duration - 8.0) < 0.1, info


def test_repeated_prompt_hits_text_cache(env):
    body = {**SMALL, "prompt": f"a lighthouse at dusk {time.time_ns()}"}
    first = env.client.post("/v1/video/generate", json={**body, "color_palette": "neutral"}, headers=AUTH)
    second = env.client.post("/v1/video/generate", json=body, headers=AUTH)
    assert first.status_code == second.status_code == 200, (summary(first), summary(second))
    # The cache is keyed by the text encoded: a field that adds no descriptor (neutral) shares it.
    assert server_timing(first)["text_cache"] == 'desc="miss"'
    assert server_timing(second)["text_cache"] == 'desc="hit"'
    assert "x-vidgen-warnings" not in first.headers and "x-vidgen-warnings" not in second.headers


def test_creative_controls_through_http(env):
    """Every control through HTTP in one request: a structured prompt with a negative phrase and a time
    directive, request keyframes, motion_intensity, color_palette, camera_motion and temporal_consistency
    (each one's measured effect: tests/media/test_controls.py, tests/pipeline/test_keyframes.py)."""
    import numpy as np

    body = {**SMALL, "seed": 77}
    plain = env.client.post("/v1/video/generate", json=body, headers=AUTH)
    graded = env.client.post("/v1/video/generate", headers=AUTH, json={
        **body, "prompt": "subject: a red fox; action: running; scene: snow; no humans; at 0.5s: it jumps",
        "keyframes": [{"time_s": 0.75, "prompt": "a red fox sitting in snow"}],
        "motion_intensity": 0.5, "color_palette": "warm", "camera_motion": "zoom", "temporal_consistency": 0.95})
    assert plain.status_code == graded.status_code == 200, (summary(plain), summary(graded))
    assert "x-vidgen-warnings" not in graded.headers
    fp, fg = decode_frames(plain.content).astype(float), decode_frames(graded.content).astype(float)
    assert fp.shape == fg.shape
    ratio = lambda f: f[..., 0].mean() / f[..., 2].mean()  # noqa: E731
    assert ratio(fg) > ratio(fp) * 1.2  # the warm grade


def test_same_seed_same_video(env):
    body = {**SMALL, "seed": 1234}
    a = env.client.post("/v1/video/generate", json=body, headers=AUTH)
    b = env.client.post("/v1/video/generate", json=body, headers=AUTH)
    c = env.client.post("/v1/video/generate", json={**body, "seed": 4321}, headers=AUTH)
    assert a.status_code == b.status_code == c.status_code == 200, [summary(x) for x in (a, b, c)]
    assert a.headers["x-vidgen-seed"] == b.headers["x-vidgen-seed"] == "1234"
    # The video's quality metrics (Decoder -> orchestrator -> header): same seed, same values.
    assert a.headers["x-vidgen-quality"] == b.headers["x-vidgen-quality"], a.headers
    quality = dict(p.split("=") for p in a.headers["x-vidgen-quality"].split(";"))
    assert set(quality) == {"temporal_ssim", "temporal_psnr_db", "flicker"}, quality
    assert 0 < float(quality["temporal_ssim"]) <= 1 and 0 < float(quality["flicker"]) <= 1
    assert 0 < float(quality["temporal_psnr_db"]) <= 100
    fa, fb, fc = decode_frames(a.content), decode_frames(b.content), decode_frames(c.content)
    assert fa.shape == fb.shape and (fa == fb).all()
    assert fa.shape == fc.shape and not (fa == fc).all()  # the seed matters


@pytest.mark.parametrize(
    "body, field, allowed",
    [
        ({**SMALL, "fps": 10}, "fps", "15..60"),
        ({**SMALL, "colour": "red"}, "colour", None),
        ({**SMALL, "style": "watercolour-unknown"}, "style", None),
        ({**SMALL, "duration": 0}, "duration", "1..30"),  # the tiny profile's range, not the static guard's
    ],
    ids=["bad-fps", "unknown-field", "unknown-style", "zero-duration"],
)
def test_invalid_fields_are_422(env, body, field, allowed):
    before = env.job_count()
    err = assert_error(env.client.post("/v1/video/generate", json=body, headers=AUTH), 422, "invalid_request")
    d = detail(err, field)
    assert d["value"] == body[field]
    if allowed is not None:
        assert d["allowed"] == allowed
    elif field == "style":
        assert "realistic" in d["allowed"] and "anime" in d["allowed"]
    else:  # unknown field: the allowed field names are listed
        assert "prompt" in d["allowed"] and "duration" in d["allowed"]
    # Bad input never becomes a job either.
    assert_error(env.client.post("/v1/video/jobs", json=body, headers=AUTH), 422, "invalid_request")
    assert env.job_count() == before


def test_invalid_json_and_non_object_are_422(env):
    r = env.client.post("/v1/video/generate", content=b'{"prompt": "x",', headers={**AUTH, "Content-Type":
                                                                                      "application/json"})
    err = assert_error(r, 422, "invalid_request")
    assert detail(err, "body")["message"].startswith("not valid JSON")
    assert err["request_id"] == r.headers["x-request-id"]
    err = assert_error(env.client.post("/v1/video/generate", json=["prompt"], headers=AUTH), 422)
    assert "JSON object" in detail(err, "body")["message"]


def test_body_too_large_is_413(env):
    body = {**SMALL, "prompt": "x" * (70 * 1024)}
    assert_error(env.client.post("/v1/video/generate", json=body, headers=AUTH), 413, "payload_too_large")


def test_auth(env):
    r = env.client.post("/v1/video/generate", json=SMALL)
    assert_error(r, 401, "unauthorized")
    assert r.headers["www-authenticate"] == "Bearer"
    assert_error(env.client.post("/v1/video/generate", json=SMALL, headers={"Authorization": "Bearer nope"}), 401)
    assert_error(env.client.get("/v1/video/jobs/" + "0" * 32, headers={"Authorization": "Basic dGVzdA=="}), 401)
    # Health endpoints are open.
    assert env.client.get("/healthz").json() == {"status": "ok"}
    ready = env.client.get("/readyz")
    assert ready.status_code == 200, summary(ready)
    deployments = ready.json()["deployments"]
    assert {"Ingress", "TextEncoder", "Denoiser", "DenoiserStandby", "Decoder", "FailoverRouter"} == set(deployments)
    assert all(d["ready"] and d["running_replicas"] >= 1 for d in deployments.values()), deployments
    # Admin endpoint: no key 401, a plain API key 403, the admin key (not an API key) 200.
    assert_error(env.client.get("/v1/admin/router"), 401, "unauthorized")
    assert_error(env.client.get("/v1/admin/router", headers=AUTH), 403, "forbidden")
    r = env.client.get("/v1/admin/router", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert r.status_code == 200, summary(r)
    # Which denoiser is active is the router's business (a loaded machine can slow the primary into a
    # legitimate failover before this runs); this test is about who may read it.
    assert r.json()["enabled"] is True and r.json()["active"] in ("primary", "standby")


def test_unknown_job_is_404(env):
    assert_error(env.client.get("/v1/video/jobs/" + "ab" * 16, headers=AUTH), 404, "not_found")
    assert_error(env.client.get("/v1/video/jobs/../../etc/passwd", headers=AUTH), 404)
    assert_error(env.client.delete("/v1/video/jobs/" + "ab" * 16, headers=AUTH), 404, "not_found")
    assert_error(env.client.get("/no/such/route", headers=AUTH), 404)


def test_docs_openapi_and_schema(env):
    docs = env.client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower(), summary(docs)
    spec = env.client.get("/openapi.json").json()
    video_request = spec["components"]["schemas"]["VideoRequest"]
    assert {"prompt", "duration", "fps", "resolution", "seed"} <= set(video_request["properties"])
    for path in ("/v1/video/generate", "/v1/video/jobs", "/v1/video/jobs/{job_id}",
                 "/v1/video/jobs/{job_id}/content", "/v1/video/batch", "/v1/prompt/analyze", "/v1/schema"):
        assert path in spec["paths"], path
    ref = spec["paths"]["/v1/video/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert ref == {"$ref": "#/components/schemas/VideoRequest"}
    schema = env.client.get("/v1/schema")
    assert schema.status_code == 200, summary(schema)
    s = schema.json()
    assert s["request"]["properties"]["fps"]["minimum"] == 15
    assert "realistic" in s["styles"]
    assert s["profile"]["name"] == "tiny" and s["profile"]["max_sequence_length"] == 64
    # One source of truth for durations: the active profile's max_duration_s (tiny: 30).
    for published in (s["request"], video_request):
        duration = published["properties"]["duration"]
        assert (duration["minimum"], duration["maximum"]) == (1, s["profile"]["max_duration_s"]) == (1, 30)
        assert "1..30" in duration["description"] and "120" not in duration["description"]


def test_prompt_analyze(env):
    r = env.client.post("/v1/prompt/analyze", json={"prompt": "主体:熊猫;动作:吃竹子;场景:竹林", "style": "anime"},
                        headers=AUTH)
    assert r.status_code == 200, summary(r)
    a = r.json()
    assert a["style"] == "anime"
    assert a["tokens"]["limit"] == 64
    assert 0 < a["tokens"]["prompt"] <= 64
    assert a["truncated"] is False and a["warnings"] == []
    assert a["parse"]["fields"] == {"subject": "熊猫", "action": "吃竹子", "scene": "竹林"}
    assert a["prompts"][0].startswith("熊猫在竹林中吃竹子")
    # Through the TextEncoder deployment: a keyframe schedule over the windows, counted per prompt.
    k = env.client.post("/v1/prompt/analyze", json={"prompt": "a fox, no humans. at 6s: a rainbow", "duration": 12},
                        headers=AUTH).json()
    assert k["negative_prompt"].startswith("humans") and len(k["tokens"]["prompts"]) == len(k["prompts"]) == 2
    assert [[p["prompt"] for p in w["prompt_weights"]] for w in k["windows"]] == [[0], [0, 1], [1]]
    seps = env.client.post("/v1/prompt/analyze", json={"prompt": "；;" * 1000}, headers=AUTH)
    assert seps.status_code == 200 and any("no words" in w for w in seps.json()["warnings"])
    long = env.client.post("/v1/prompt/analyze", json={"prompt": "a very long prompt " * 100}, headers=AUTH).json()
    assert long["tokens"]["prompt"] > 64
    assert long["truncated"] is True
    assert any("prompt" in w and "64" in w for w in long["warnings"])
    err = assert_error(env.client.post("/v1/prompt/analyze", json={"prompt": "x", "fps": 30}, headers=AUTH), 422)
    assert detail(err, "fps")["message"] == "unknown field"
    assert_error(env.client.post("/v1/prompt/analyze", json={"prompt": "x"}), 401)


def test_job_lifecycle(env):
    import ray

    body = {**SMALL, "duration": 2, "num_inference_steps": 12, "seed": 99, "color_palette": "warm"}
    ray.get(env.gate.close.remote())  # hold the decode: the job's decode-stage record is checked below
    try:
        r = env.client.post("/v1/video/jobs", json=body, headers=AUTH)
        assert r.status_code == 202, summary(r)
        job_id = r.json()["job_id"]
        env.held_decodes(1)
        decoding = env.client.get(f"/v1/video/jobs/{job_id}", headers=AUTH).json()
        early = env.client.get(f"/v1/video/jobs/{job_id}/content", headers=AUTH)
        # Another key cannot see (or cancel, or download) it.
        assert_error(env.client.get(f"/v1/video/jobs/{job_id}", headers=OTHER_AUTH), 404, "not_found")
        assert_error(env.client.delete(f"/v1/video/jobs/{job_id}", headers=OTHER_AUTH), 404, "not_found")
    finally:
        ray.get(env.gate.open.remote())
    assert r.headers["location"] == f"/v1/video/jobs/{job_id}"
    assert r.json()["state"] in ("queued", "running")
    assert_error(early, 404, "not_ready")
    # color_palette is applied: nothing to warn about.
    assert "x-vidgen-warnings" not in r.headers and r.json()["warnings"] == []
    # Denoising is over, the decode has begun: an overall fraction and an estimate of the rest.
    assert decoding["state"] == "running" and decoding["stage"] == "decode", decoding
    p = decoding["progress"]
    assert p["stage"] == "decode" and 0 < p["fraction"] < 1 and p["eta_s"] is not None and p["eta_s"] >= 0, p
    seen: list[dict] = []
    job = wait_job(env, job_id, seen=seen)
    assert job["state"] == "succeeded", job
    assert {j["stage"] for j in seen if j["state"] == "running"} <= {"decode"}  # polled after the hold
    fractions = [decoding["progress"]["fraction"]] + [j["progress"]["fraction"] for j in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0, fractions  # only forward, to the end
    assert job["progress"] == {"stage": None, "fraction": 1.0, "eta_s": 0.0}
    assert job["warnings"] == []
    assert job["error"] is None and job["attempts"] == 1 and job["seed"] == 99
    assert {"text_encode", "denoise", "vae_decode", "encode", "total"} <= set(job["timings"])
    assert set(job["quality"]) == {"temporal_ssim", "temporal_psnr_db", "flicker"}, job
    assert 0 < job["quality"]["temporal_ssim"] <= 1 and 0 < job["quality"]["flicker"] <= 1
    content = env.client.get(f"/v1/video/jobs/{job_id}/content", headers=AUTH)
    assert content.status_code == 200, summary(content)
    assert content.headers["content-type"] == "video/mp4"
    assert content.content[4:8] == b"ftyp"
    part = env.client.get(f"/v1/video/jobs/{job_id}/content", headers={**AUTH, "Range": "bytes=0-99"})
    assert part.status_code == 206, summary(part)
    assert len(part.content) == 100 and part.content == content.content[:100]
    assert part.headers["content-range"] == f"bytes 0-99/{len(content.content)}"
    assert_error(env.client.get(f"/v1/video/jobs/{job_id}/content", headers=OTHER_AUTH), 404)
    assert_error(env.client.delete(f"/v1/video/jobs/{job_id}", headers=AUTH), 409, "already_final")
    env.shared["finished_job"] = (job_id, content.content)


def test_cancel_running_job(env):
    body = {**SMALL, "duration": 12, "num_inference_steps": 50, "seed": 5}
    r = env.client.post("/v1/video/jobs", json=body, headers=AUTH)
    assert r.status_code == 202, summary(r)
    job_id = r.json()["job_id"]
    deadline = time.monotonic() + 120
    while True:
        job = env.client.get(f"/v1/video/jobs/{job_id}", headers=AUTH).json()
        if job["state"] == "running" and job["progress"].get("step", 0) >= 1:
            break
        assert job["state"] in ("queued", "running") and time.monotonic() < deadline, job
        time.sleep(0.1)
    r = env.client.delete(f"/v1/video/jobs/{job_id}", headers=AUTH)
    assert r.status_code == 202, summary(r)
    t0 = time.monotonic()
    job = wait_job(env, job_id, timeout_s=30)
    assert job["state"] == "cancelled", job
    assert time.monotonic() - t0 < 10
    assert job["progress"]["step"] < job["progress"]["steps"] == 50
    assert job["error"]
    assert_error(env.client.delete(f"/v1/video/jobs/{job_id}", headers=AUTH), 409, "already_final")
    err = assert_error(env.client.get(f"/v1/video/jobs/{job_id}/content", headers=AUTH), 410, "job_cancelled")
    assert "never will" in err["message"]


def test_batch(env):
    items = [{**SMALL, "seed": i} for i in range(3)]
    r = env.client.post("/v1/video/batch", json={"requests": items}, headers=AUTH)
    assert r.status_code == 202, summary(r)
    ids = [j["job_id"] for j in r.json()["jobs"]]
    assert len(set(ids)) == 3
    for job_id, item in zip(ids, items):
        job = wait_job(env, job_id)
        assert job["state"] == "succeeded", job
        assert job["seed"] == item["seed"]
    # One bad item: 422 naming it, nothing queued.
    before = env.job_count()
    bad = [dict(SMALL), {**SMALL, "fps": 99}, dict(SMALL)]
    err = assert_error(env.client.post("/v1/video/batch", json={"requests": bad}, headers=AUTH), 422,
                       "invalid_request")
    assert detail(err, "requests.1.fps")["allowed"] == "15..60"
    assert all(d["field"].startswith("requests.1.") for d in err["details"])
    assert_error(env.client.post("/v1/video/batch", json={"requests": []}, headers=AUTH), 422)
    assert_error(env.client.post("/v1/video/batch", json=[SMALL], headers=AUTH), 422)
    # More than the queue takes (max_queued_jobs=4): 429, nothing queued.
    r = env.client.post("/v1/video/batch", json={"requests": [SMALL] * 5}, headers=AUTH)
    assert_error(r, 429, "overloaded")
    assert r.headers["retry-after"] == str(RETRY_AFTER_S)
    assert env.job_count() == before


def test_overload_gets_429_fast(env):
    body = {**SMALL, "duration": 2, "num_inference_steps": 10}

    def call(i):
        t0 = time.monotonic()
        r = httpx.post(f"{env.base_url}/v1/video/generate", json={**body, "seed": i}, headers=AUTH, timeout=300,
                       trust_env=False)
        return r, time.monotonic() - t0

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(call, range(4)))
    ok = [(r, t) for r, t in results if r.status_code == 200]
    rejected = [(r, t) for r, t in results if r.status_code == 429]
    assert len(ok) + len(rejected) == 4, [summary(r) for r, _ in results]
    assert ok and rejected
    slowest_ok = max(t for _, t in ok)
    for r, t in rejected:
        assert_error(r, 429, "overloaded")
        assert r.headers["retry-after"] == str(RETRY_AFTER_S)
        assert t < slowest_ok / 2, (t, slowest_ok)  # refused at once, not after waiting


def test_tracing_spans_reach_collector(env):
    r = env.client.post("/v1/video/generate", json={**SMALL, "seed": 77}, headers=AUTH)
    assert r.status_code == 200, summary(r)
    rid = r.headers["x-request-id"]
    deadline = time.monotonic() + 30
    while True:
        spans = env.collector.snapshot()
        roots = [s for s in spans if s["name"] == "POST /v1/video/generate" and s["attributes"].get("request_id")
                 == rid]
        if roots:
            trace = [s for s in spans if s["trace_id"] == roots[0]["trace_id"]]
            if {"text_encode", "denoise", "decode"} <= {s["name"] for s in trace}:
                break
        assert time.monotonic() < deadline, f"spans never arrived: {[s['name'] for s in spans]}"
        time.sleep(0.5)
    by_name = {s["name"]: s for s in trace}
    generate = by_name["generate"]
    assert generate["parent"] == roots[0]["span_id"]
    for stage in ("text_encode", "denoise", "decode"):
        assert by_name[stage]["parent"] == generate["span_id"], by_name[stage]


def test_metrics_exported(env):
    url = f"http://127.0.0.1:{env.metrics_port}/metrics"
    wanted = ("vidgen_requests", "vidgen_stage_latency_seconds", "vidgen_text_cache", "vidgen_video_temporal_ssim",
              "vidgen_video_temporal_psnr_db", "vidgen_video_flicker_score")
    deadline = time.monotonic() + 60
    text = ""
    while time.monotonic() < deadline:
        try:
            text = httpx.get(url, timeout=10, trust_env=False).text
        except httpx.HTTPError:
            text = ""
        if all(w in text for w in wanted) and 'stage="denoise"' in text:
            break
        time.sleep(1)
    lines = [ln for ln in text.splitlines() if "vidgen_" in ln and not ln.startswith("#")]
    assert all(w in text for w in wanted), lines
    latency = [ln for ln in lines if "vidgen_stage_latency_seconds" in ln]
    for stage in ("text_encode", "denoise", "decode"):
        assert any(f'stage="{stage}"' in ln for ln in latency), latency
    assert any("vidgen_requests" in ln and 'endpoint="generate"' in ln and 'status="ok"' in ln for ln in lines)
    assert any("vidgen_text_cache" in ln and 'result="hit"' in ln for ln in lines)
    # One observation per decoded video in each quality histogram.
    for name in ("vidgen_video_temporal_ssim", "vidgen_video_temporal_psnr_db", "vidgen_video_flicker_score"):
        counts = [ln for ln in lines if f"{name}_count" in ln and 'profile="tiny"' in ln]
        assert counts and float(counts[0].rsplit(" ", 1)[1]) >= 1, lines


def test_killed_stage_replica(env):
    """A decoder replica dies with a job's decode and a sync request's decode in it: both get
    a clean failure naming the stage (no hang, no 500), and Serve replaces the replica.

    Both decodes are held at the Decoder's fault-injection gate, so they are certainly in
    the replica when it is killed, however fast a decode is on this machine."""
    import ray

    ray.get(env.gate.close.remote())
    try:
        r = env.client.post("/v1/video/jobs", json={**SMALL, "seed": 11}, headers=AUTH)
        assert r.status_code == 202, summary(r)
        job_id = r.json()["job_id"]
        with ThreadPoolExecutor(1) as pool:
            sync = pool.submit(httpx.post, f"{env.base_url}/v1/video/generate", json={**SMALL, "seed": 12},
                               headers=AUTH, timeout=300, trust_env=False)
            env.held_decodes(2)  # the Decoder takes 2 at once (max_ongoing_requests)
            assert not sync.done(), summary(sync.result())
            assert env.client.get(f"/v1/video/jobs/{job_id}", headers=AUTH).json()["stage"] == "decode"
            names = replica_actor_names("Decoder")
            assert len(names) == 1, names
            ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
            resp = sync.result()
    finally:
        ray.get(env.gate.open.remote())
    err = assert_error(resp, 503, "stage_unavailable")
    assert "decode" in err["message"]
    assert resp.headers["retry-after"] == str(RETRY_AFTER_S)
    job = wait_job(env, job_id, timeout_s=60)
    assert job["state"] == "failed" and "decode" in job["error"], job
    err = assert_error(env.client.get(f"/v1/video/jobs/{job_id}/content", headers=AUTH), 410, "job_failed")
    assert "never will" in err["message"] and "decode" in err["message"]
    # Serve replaces the replica; then requests succeed again.
    deadline = time.monotonic() + 180
    while True:
        current = replica_actor_names("Decoder")
        if current and names[0] not in current and env.client.get("/readyz").status_code == 200:
            break
        assert time.monotonic() < deadline, current
        time.sleep(0.5)
    r = env.client.post("/v1/video/generate", json={**SMALL, "seed": 13}, headers=AUTH)
    assert r.status_code == 200, summary(r)


# ---- phase 2: full restart with the same state_dir (short deadline) -------------------------


@pytest.fixture(scope="module")
def restarted(env):
    """`serve.delete` + `serve.run` again with the same state_dir; two stale jobs planted in between."""
    from ray import serve

    from vidgen_serve.config import AppConfig
    from vidgen_serve.plan import build_plan
    from vidgen_serve.request import parse_request
    from vidgen_serve.serving.auth import key_id
    from vidgen_serve.state.sqlite import SQLiteJobStore

    assert "finished_job" in env.shared, "test_job_lifecycle must run first"
    serve.delete(APP)

    async def plant() -> dict[str, str]:
        # Two jobs claimed by a replica that then died (no heartbeat for an hour).
        store = SQLiteJobStore(env.state_dir / "jobs.sqlite3")
        await store.start()
        planted = {}
        for name, attempts in (("resumable", 1), ("exhausted", 2)):
            request = parse_request({**SMALL, "seed": 500 + attempts})
            plan = build_plan(request, AppConfig())
            job = await store.create(request.model_dump(mode="json"), plan.model_dump(mode="json"), key_id(API_KEY))
            planted[name] = job.id
        await store.claim("dead-replica-owner", 2)
        await store.close()
        return planted

    planted = asyncio.run(plant())
    with env.db() as conn:
        for name, attempts in (("resumable", 1), ("exhausted", 2)):
            conn.execute("UPDATE jobs SET heartbeat_at = ?, attempts = ?, stage = 'denoise', progress = ? "
                         "WHERE id = ?", (time.time() - 3600, attempts,
                                          json.dumps({"step": 1, "steps": 2, "window": 1, "windows": 1}),
                                          planted[name]))
    serve.run(env.app(), name=APP, route_prefix="/")  # a full restart, same state_dir
    _wait_ready(env.client)
    return planted


def test_jobs_survive_restart(env, restarted):
    job_id, data = env.shared["finished_job"]
    r = env.client.get(f"/v1/video/jobs/{job_id}/content", headers=AUTH)
    assert r.status_code == 200 and r.content == data, summary(r)
    assert env.client.get(f"/v1/video/jobs/{job_id}", headers=AUTH).json()["state"] == "succeeded"

    resumed = wait_job(env, restarted["resumable"], timeout_s=120)
    assert resumed["state"] == "succeeded", resumed["error"]
    assert resumed["attempts"] == 2
    content = env.client.get(f"/v1/video/jobs/{restarted['resumable']}/content", headers=AUTH)
    assert content.status_code == 200, summary(content)

    exhausted = wait_job(env, restarted["exhausted"], timeout_s=60)
    assert exhausted["state"] == "failed", exhausted
    assert "out of attempts" in exhausted["error"]
    assert exhausted["attempts"] == 2


def test_deadline_is_504(env, restarted):
    t0 = time.monotonic()
    # A client deadline far below what this request needs (tens of seconds of 1080p encode alone).
    r = env.client.post("/v1/video/generate", json={**SMALL, "duration": 30, "resolution": "1080p"},
                        headers={**AUTH, "X-Vidgen-Timeout": "2"})
    elapsed = time.monotonic() - t0
    err = assert_error(r, 504, "deadline_exceeded")
    assert "2s deadline" in err["message"]
    assert 2 <= elapsed < 30
    # The abandoned work was cancelled downstream: the pipeline serves the next request.
    ok = env.client.post("/v1/video/generate", json={**SMALL, "seed": 3}, headers=AUTH)
    assert ok.status_code == 200, summary(ok)


def test_deadline_header_is_validated(env):
    for bad in ("soon", "0", "-1", "nan", "100000"):
        r = env.client.post("/v1/video/generate", json=SMALL, headers={**AUTH, "X-Vidgen-Timeout": bad})
        err = assert_error(r, 422, "invalid_request")
        assert err["details"][0]["field"] == "X-Vidgen-Timeout", err
        assert "allowed" in err["details"][0]


# ---- tracing, in process (no Ray) --------------------------------------------------------------


def test_child_spans_share_the_trace(monkeypatch):
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
        InMemorySpanExporter,
    )

    from vidgen_serve.serving import telemetry

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(telemetry, "tracer", lambda: provider.get_tracer("test"))

    with telemetry.tracer().start_as_current_span("POST /v1/video/generate") as root:
        carrier = telemetry.carrier_for_current_span()
    assert "traceparent" in carrier

    def stage(name):  # another thread: no ambient context, like another process
        with telemetry.child_span(name, json.loads(json.dumps(carrier)), steps=2) as span:
            span.set_attribute("ok", True)

    for name in ("text_encode", "denoise", "decode"):
        t = threading.Thread(target=stage, args=(name,))
        t.start()
        t.join()
    with telemetry.child_span("orphan", None):
        pass
    spans = {s.name: s for s in exporter.get_finished_spans()}
    root_ctx = root.get_span_context()
    for name in ("text_encode", "denoise", "decode"):
        s = spans[name]
        assert s.context.trace_id == root_ctx.trace_id
        assert s.parent is not None and s.parent.span_id == root_ctx.span_id
        assert s.attributes["steps"] == 2
    assert spans["orphan"].context.trace_id != root_ctx.trace_id
    assert spans["orphan"].parent is None
