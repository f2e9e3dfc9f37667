"""Queue-driven autoscaling of the Denoiser on a local Ray cluster.

Dispatch is held deterministically (`max_running_jobs: 0`: the ingress accepts jobs and
runs none), so the scale-up can only come from the queue, never from denoise requests.
"""

from __future__ import annotations

import time

import httpx
import pytest

from vidgen_serve.net import find_free_port
from vidgen_serve.serving.autoscaling import policy_config

pytestmark = pytest.mark.slow

REDIS_URL = "redis://127.0.0.1:6379/0"
KEY = "state-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SMALL = {"prompt": "a red fox", "duration": 1, "resolution": "480p", "num_inference_steps": 2}
FAST_SCALING = {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 1, "upscale_delay_s": 0,
                "downscale_delay_s": 1, "metrics_interval_s": 0.5, "look_back_period_s": 2,
                "policy": policy_config()}
ONE = {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}}


@pytest.fixture(scope="module")
def cluster():
    import os

    import ray
    from ray import serve

    saved = os.environ.get("VIDGEN_API_KEYS")
    os.environ["VIDGEN_API_KEYS"] = KEY  # replicas inherit the driver's environment
    port = find_free_port()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        if saved is None:
            os.environ.pop("VIDGEN_API_KEYS", None)
        else:
            os.environ["VIDGEN_API_KEYS"] = saved


def _denoiser_replicas(app: str) -> dict:
    from ray import serve

    states = serve.status().applications[app].deployments["Denoiser"].replica_states
    return {str(k): v for k, v in states.items() if v}


def _wait(condition, what: str, timeout_s: float = 120):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out: {what}")


def test_queued_jobs_scale_the_denoiser_before_dispatch(cluster, redis_namespace, tmp_path):
    from ray import serve

    from vidgen_serve.serve import compose_app

    args = {"state_dir": str(tmp_path), "job_store": REDIS_URL, "job_store_namespace": redis_namespace,
            "max_running_jobs": 0, "max_queued_jobs": 100, "max_batch_size": 50, "standby": False}
    app = compose_app(args, {"Denoiser": {"autoscaling_config": FAST_SCALING}, "TextEncoder": ONE, "Decoder": ONE,
                           "Ingress": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}}})
    serve.run(app, name="scaling", route_prefix="/")
    try:
        assert sum(_denoiser_replicas("scaling").values()) == 1
        with httpx.Client(base_url=cluster, timeout=60, trust_env=False) as client:
            r = client.post("/v1/video/batch", json={"requests": [{**SMALL, "seed": i} for i in range(50)]},
                            headers=AUTH)
            assert r.status_code == 202, r.text
            ids = [j["job_id"] for j in r.json()["jobs"]]
            # 50 queued jobs: the autoscaler's target for the Denoiser goes to its maximum...
            _wait(lambda: sum(_denoiser_replicas("scaling").values()) == 3, "the Denoiser to scale to 3")
            # ...while none of them has been dispatched.
            states = {client.get(f"/v1/video/jobs/{i}", headers=AUTH).json()["state"] for i in ids}
            assert states == {"queued"}
            for job_id in ids:  # the queue empties (a queued job is cancelled at once)
                assert client.delete(f"/v1/video/jobs/{job_id}", headers=AUTH).status_code == 202
        _wait(lambda: _denoiser_replicas("scaling") == {"RUNNING": 1}, "the Denoiser to scale back to 1")
    finally:
        serve.delete("scaling")
