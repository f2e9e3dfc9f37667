"""The Serve application with a tensor-parallel Denoiser (TP=2 over gloo on CPU)."""

from __future__ import annotations

import io
import os
import signal
import time

import pytest

from vidgen_serve.net import find_free_port

pytestmark = pytest.mark.slow

API_KEY = "tp-serve-key"




def _tp_workers() -> dict:
    import ray._private.state

    return {aid: a for aid, a in ray._private.state.actors().items()
            if a.get("ActorClassName") == "ParallelWorker"}


def _live_placement_groups() -> list:
    import ray

    return [pid for pid, pg in ray.util.placement_group_table().items() if pg.get("state") != "REMOVED"]


def _wait(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.5)
    return predicate()


def test_tp2_app_serves_the_product_guide_call_and_cleans_up(tmp_path):
    import av
    import httpx
    import ray
    from ray import serve

    from vidgen_serve.serve import build_app

    os.environ["VIDGEN_API_KEYS"] = API_KEY
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        port = find_free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app({"model": {"profile_overrides": {"tensor_parallel_size": 2}},
                         "state_dir": str(tmp_path), "standby": False})
        serve.run(app, name="vidgen_tp", route_prefix="/")

        # One Denoiser replica = a placement group holding 2 rank workers.
        workers = {aid: a for aid, a in _tp_workers().items() if a["State"] == "ALIVE"}
        assert len(workers) == 2, workers
        assert len(_live_placement_groups()) == 1

        r = httpx.post(f"http://127.0.0.1:{port}/v1/video/generate",
                       headers={"Authorization": f"Bearer {API_KEY}"}, timeout=600,
                       json={"prompt": "一只橘猫在樱花树下追逐蝴蝶", "style": "realistic", "duration": 8,
                             "resolution": "1080p"})
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "video/mp4"
        with av.open(io.BytesIO(r.content)) as container:
            stream = container.streams.video[0]
            assert (stream.codec_context.name, stream.width, stream.height) == ("h264", 1920, 1080)
            assert sum(1 for _ in container.decode(video=0)) == 240

        # A rank dies: the next request fails with a clear 503, the replica turns unhealthy,
        # Serve replaces it (a new placement group and 2 new ranks), and service resumes.
        small = {"prompt": "a red kite", "duration": 1, "resolution": "480p", "seed": 5}
        victim = next(iter(workers))
        os.kill(workers[victim]["Pid"], signal.SIGKILL)  # a crashed rank process
        assert _wait(lambda: _tp_workers()[victim]["State"] == "DEAD", 30)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/video/generate",
                       headers={"Authorization": f"Bearer {API_KEY}"}, timeout=300, json=small)
        assert r.status_code == 503, r.text
        error = r.json()["error"]
        assert error["code"] == "stage_unavailable" and "parallel worker group" in error["message"], error

        def recovered() -> bool:
            alive = [a for a in _tp_workers().values() if a["State"] == "ALIVE"]
            if len(alive) != 2 or victim in alive:
                return False
            resp = httpx.post(f"http://127.0.0.1:{port}/v1/video/generate",
                              headers={"Authorization": f"Bearer {API_KEY}"}, timeout=300, json=small)
            return resp.status_code == 200

        assert _wait(recovered, 180), _tp_workers()

        serve.shutdown()
        # No zombie rank workers, no leaked placement group.
        assert _wait(lambda: all(a["State"] == "DEAD" for a in _tp_workers().values()), 60), _tp_workers()
        assert _wait(lambda: not _live_placement_groups(), 60), ray.util.placement_group_table()
    finally:
        serve.shutdown()
        ray.shutdown()
