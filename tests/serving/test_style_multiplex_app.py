"""Style LoRA adapters through the live Ray Serve application (tiny profile, CPU, real HTTP).

One private cluster and one application (no standby) whose denoiser replica keeps at most one
adapter (`max_styles_per_replica: 1`), so Serve's multiplexing must evict to serve the second
LoRA style. The replica's `style_stats` shows what reached it: the multiplexed model ids, the
adapters loaded, and the eviction that went through the cached handle's teardown.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import httpx
import pytest
from live_app import api_keys_env, wait_until_ready

from vidgen_serve.config import DEFAULT_STYLES
from vidgen_serve.net import find_free_port

pytestmark = pytest.mark.slow

APP = "vidgen_styles"
API_KEY = "stylekey"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
SMALL = {"prompt": "a red fox running through snow", "duration": 1, "resolution": "480p", "num_inference_steps": 2,
         "seed": 3}


@pytest.fixture(scope="module")
def app():
    import ray
    from ray import serve

    from vidgen_serve.serve import compose_app

    http_port = find_free_port()
    state_dir = Path(tempfile.mkdtemp(prefix="vidgen-styles-test-"))
    styles = {name: preset.model_dump() for name, preset in DEFAULT_STYLES.items()}
    styles["broken"] = {"lora": str(state_dir / "no-such-adapter" / "pytorch_lora_weights.safetensors")}
    args = {"state_dir": str(state_dir), "standby": False, "max_styles_per_replica": 1,
            "model": {"styles": styles}}
    with api_keys_env(API_KEY):  # replicas inherit it (Ray is started from here)
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": http_port})
            serve.run(compose_app(args), name=APP, route_prefix="/")
            client = httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=600, trust_env=False)
            wait_until_ready(client, timeout_s=240)
            yield client, serve.get_deployment_handle("Denoiser", app_name=APP)
            client.close()
        finally:
            try:
                serve.shutdown()
            finally:
                ray.shutdown()


def _generate(client: httpx.Client, style: str) -> httpx.Response:
    return client.post("/v1/video/generate", json={**SMALL, "style": style}, headers=AUTH)


def test_lora_styles_are_multiplexed_to_the_replica(app):
    client, denoiser = app
    schema = client.get("/v1/schema", headers=AUTH).json()
    assert schema["style_adapters"] == ["broken", "cinematic", "ink-wash"]

    videos = {}
    for style in ("ink-wash", "ink-wash", "cinematic", "realistic"):
        resp = _generate(client, style)
        assert resp.status_code == 200, resp.text
        assert resp.headers["content-type"] == "video/mp4"
        videos.setdefault(style, []).append(resp.content)
    assert videos["ink-wash"][0] == videos["ink-wash"][1]  # same style, same seed: same video
    assert len({videos["ink-wash"][0], videos["cinematic"][0], videos["realistic"][0]}) == 3

    stats = denoiser.style_stats.remote().result()
    # The multiplexed model id reached the replica for the LoRA styles only (not the plain one).
    assert stats["requests"] == {"ink-wash": 2, "cinematic": 1}
    # ink-wash was read once (its second request was a hit); cinematic evicted it (limit 1) through
    # Serve's multiplexing, whose cached handle unloaded it from the transformer.
    assert stats["load_counts"] == {"ink-wash": 1, "cinematic": 1}
    assert stats["multiplexed_loads"] == 2
    assert stats["evictions"] == ["ink-wash"]
    assert stats["loaded"] == ["cinematic"] and stats["multiplexed"] == ["cinematic"]


def test_unavailable_adapter_is_503_naming_the_style_and_others_still_work(app):
    client, denoiser = app
    resp = _generate(client, "broken")
    assert resp.status_code == 503, resp.text
    body = resp.json()
    assert body["error"]["code"] == "style_unavailable"
    assert "'broken'" in body["error"]["message"]
    assert "Retry-After" in resp.headers
    # Unknown styles stay a 422 listing the presets.
    resp = _generate(client, "no-such-style")
    assert resp.status_code == 422
    assert "ink-wash" in resp.json()["error"]["details"][0]["allowed"]
    # The same replica keeps serving the other styles, LoRA and plain.
    for style in ("ink-wash", "realistic"):
        assert _generate(client, style).status_code == 200
    assert "broken" not in denoiser.style_stats.remote().result()["loaded"]
