"""Queue-driven autoscaling: the policy's arithmetic on Serve's own context and config, and
the probe stage replicas report from a real job store. (The live scale-up on a local Ray
cluster is in tests/serving/test_state_app.py.)"""

from __future__ import annotations

import asyncio

from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve.config import AutoscalingConfig, AutoscalingContext, AutoscalingPolicy

from vidgen_serve.serving.autoscaling import (POLICY_IMPORT_PATH, QUEUED_JOBS_METRIC, QueueDepthProbe,
                                              policy_config, queue_depth_policy)
from vidgen_serve.serving.settings import ServeSettings


def _ctx(replicas: int, requests: float, queued_reports: list[float], target: float = 1.0) -> AutoscalingContext:
    dep = DeploymentID(name="Denoiser", app_name="vidgen")
    ids = [ReplicaID(unique_id=f"r{i}", deployment_id=dep) for i in range(len(queued_reports))]
    config = AutoscalingConfig(min_replicas=1, max_replicas=8, target_ongoing_requests=target,
                               policy=AutoscalingPolicy(**policy_config()))
    return AutoscalingContext(
        deployment_id=dep, deployment_name="Denoiser", app_name="vidgen", current_num_replicas=replicas,
        target_num_replicas=replicas, running_replicas=ids, total_num_requests=requests, total_queued_requests=0,
        aggregated_metrics={QUEUED_JOBS_METRIC: dict(zip(ids, queued_reports))}, raw_metrics={},
        capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=8, policy_state={},
        last_scale_up_time=None, last_scale_down_time=None, current_time=None, config=config)


def test_queued_jobs_count_as_work():
    # One replica, idle, 50 jobs waiting: 50 replicas' worth of work (Serve caps it at max_replicas).
    desired, state = queue_depth_policy(_ctx(1, 0, [50.0]))
    assert desired == 50 and state == {QUEUED_JOBS_METRIC: 50.0}
    # Two replicas report the same store: the larger report counts once, not the sum.
    desired, _ = queue_depth_policy(_ctx(2, 2, [6.0, 5.0], target=2.0))
    assert desired == (2 + 6) / 2
    # Empty queue: the live requests alone decide (here: fewer than one replica's worth).
    desired, state = queue_depth_policy(_ctx(3, 1, [0.0, 0.0, 0.0]))
    assert desired == 1 and state[QUEUED_JOBS_METRIC] == 0
    # No reports yet (replicas starting): the requests alone decide.
    desired, _ = queue_depth_policy(_ctx(2, 4, []))
    assert desired == 4


def test_policy_config_imports_the_policy():
    policy = AutoscalingPolicy(**policy_config())
    assert policy.policy_function == POLICY_IMPORT_PATH
    assert policy.get_policy()(_ctx(1, 0, [3.0]))[0] == 3  # Serve's serialized copy computes the same


def test_probe_reads_the_store_and_keeps_the_last_value_when_it_fails(tmp_path):
    settings = ServeSettings(state_dir=tmp_path)

    async def body():
        store = settings.open_job_store()
        await store.start()
        for _ in range(3):
            await store.create({"prompt": "x"}, {"seed": 1}, "k")
        probe = QueueDepthProbe(settings, min_interval_s=0)
        assert await probe.stats() == {QUEUED_JOBS_METRIC: 3.0}
        await store.claim("owner", 1)
        assert await probe.depth() == 2
        await probe._store.close()  # the store goes away under the probe
        assert await probe.depth() == 2
        cached = QueueDepthProbe(settings, min_interval_s=3600)
        assert await cached.depth() == 2
        await store.create({"prompt": "x"}, {"seed": 1}, "k")
        assert await cached.depth() == 2  # read at most once per interval
        await cached.close()
        await store.close()

    asyncio.run(body())
