"""The Serve application with the tiny profile in bfloat16 (profile_overrides), over real HTTP.

One small application (no standby) and one request: the served video is the in-process bfloat16
pipeline's video, frame for frame, and not the float32 one.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest

from vidgen_serve.net import find_free_port

pytestmark = pytest.mark.slow

API_KEY = "bf16-key"
# Thread counts pinned on both sides: x264 output depends on its thread count, and so do bf16 matmuls
# on the CPU (the tiny video's frames move by ~4 levels between 1 and 2 torch threads). The replicas
# inherit OMP_NUM_THREADS=1 from the driver; the in-process reference runs at 1 torch thread too.
BF16 = {"dtype": "bfloat16", "vae_dtype": "bfloat16", "decoder_threads": 2}
TORCH_THREADS = 1
REQUEST = {"prompt": "a red fox running through snow", "duration": 1, "resolution": "480p",
           "num_inference_steps": 2, "seed": 4}


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    import ray
    from ray import serve

    from vidgen_serve.serve import build_app

    with pytest.MonkeyPatch.context() as env:
        env.setenv("VIDGEN_API_KEYS", API_KEY)  # replicas inherit the driver's environment
        env.setenv("OMP_NUM_THREADS", str(TORCH_THREADS))  # Ray keeps a driver's setting for its workers
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
        try:
            port = find_free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            app = build_app({"model": {"profile_overrides": BF16}, "standby": False,
                             "state_dir": str(tmp_path_factory.mktemp("bf16-state"))})
            serve.run(app, name="vidgen_bf16", route_prefix="/")
            yield f"http://127.0.0.1:{port}"
        finally:
            serve.shutdown()
            ray.shutdown()


def test_bf16_profile_serves_the_bf16_video(base_url, probe_mp4, pipeline, tiny_config):
    import httpx
    import torch

    from vidgen_serve.config import AppConfig
    from vidgen_serve.pipeline import VideoPipeline
    from vidgen_serve.plan import build_plan
    from vidgen_serve.request import VideoRequest

    r = httpx.post(f"{base_url}/v1/video/generate", json=REQUEST, headers={"Authorization": f"Bearer {API_KEY}"},
                   timeout=600, trust_env=False)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "video/mp4"
    with tempfile.TemporaryDirectory() as tmp:
        served_path = os.path.join(tmp, "served.mp4")
        with open(served_path, "wb") as f:
            f.write(r.content)
        served = probe_mp4(served_path)
        assert (served["codec"], served["width"], served["height"], served["num_frames"]) == ("h264", 854, 480, 30)
        config = AppConfig(profile_overrides=BF16)
        plan = build_plan(VideoRequest(**REQUEST), config)
        threads = torch.get_num_threads()
        torch.set_num_threads(TORCH_THREADS)
        try:
            bf16 = probe_mp4(VideoPipeline(config).generate(plan, os.path.join(tmp, "bf16.mp4")).path)["frames"]
            fp32 = probe_mp4(pipeline.generate(build_plan(VideoRequest(**REQUEST), tiny_config),
                                               os.path.join(tmp, "fp32.mp4")).path)["frames"]
        finally:
            torch.set_num_threads(threads)
    frames = served["frames"].astype(int)
    assert np.abs(frames - bf16.astype(int)).mean() < 0.1  # the bf16 pipeline, as run in-process
    assert np.abs(frames - fp32.astype(int)).mean() > 0.2  # not the float32 one


def test_prompt_attention_served_by_the_denoiser_replica(base_url, tiny_config):
    """`POST /v1/prompt/attention`: JSON (PNG in png_base64) or, with Accept: image/png, the PNG itself;
    the maps are the in-process bf16 stages' maps of the same plan."""
    import base64
    import io
    import json

    import httpx
    import torch
    from PIL import Image

    from vidgen_serve.attention import AttentionRequest, attention_plan
    from vidgen_serve.config import AppConfig
    from vidgen_serve.pipeline.attention_maps import attention_maps
    from vidgen_serve.pipeline.denoiser import Denoiser
    from vidgen_serve.pipeline.text_encoder import TextEncoder

    body = {"prompt": "主体:熊猫;动作:吃竹子", "seed": 5, "steps": 2, "frames": 2}
    auth = {"Authorization": f"Bearer {API_KEY}"}
    r = httpx.post(f"{base_url}/v1/prompt/attention", json=body, headers=auth, timeout=600, trust_env=False)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["frames"] == 2 and doc["grid"]["rows"] == 2
    assert [f["name"] for f in doc["fields"]] == ["subject", "action"]  # the parser's names
    assert doc["grid"]["cols"] == len(doc["tokens"]) + 2 and "</s>" not in doc["tokens"]
    png = base64.b64decode(doc["png_base64"])
    assert Image.open(io.BytesIO(png)).size == (doc["grid"]["width"], doc["grid"]["height"])
    r = httpx.post(f"{base_url}/v1/prompt/attention", json=body, headers={**auth, "Accept": "image/png"},
                   timeout=600, trust_env=False)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert json.loads(r.headers["X-Vidgen-Columns"]) == doc["tokens"] + ["subject", "action"]
    assert Image.open(io.BytesIO(r.content)).size == (doc["grid"]["width"], doc["grid"]["height"])
    config = AppConfig(profile_overrides=BF16)
    plan = attention_plan(AttentionRequest(**body), config)
    text_encoder = TextEncoder(config)
    local = attention_maps(Denoiser(config), plan, text_encoder.encode(plan), text_encoder.tokens(plan.prompts[0]),
                           body["prompt"])
    assert local.tokens == doc["tokens"]
    torch.testing.assert_close(torch.tensor(doc["mean_weights"]), torch.tensor(local.token_weights),
                               atol=1e-3, rtol=0)
    bad = httpx.post(f"{base_url}/v1/prompt/attention", json={**body, "steps": 99}, headers=auth, timeout=60,
                     trust_env=False)
    assert bad.status_code == 422 and bad.json()["error"]["details"][0]["field"] == "steps"
