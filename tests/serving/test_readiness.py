"""Readiness (`GET /readyz`): running replicas decide, not the autoscaler's status; no blocking on the loop."""

from __future__ import annotations

import asyncio
import threading

import pytest
from ray.serve._private.common import DeploymentStatus, DeploymentStatusTrigger, ReplicaState
from ray.serve.schema import DeploymentStatusOverview

from vidgen_serve.serving.readiness import ReadinessCheck, readiness


def overview(status: DeploymentStatus, running: int, starting: int = 0) -> DeploymentStatusOverview:
    replicas = {ReplicaState.RUNNING: running, ReplicaState.STARTING: starting}
    return DeploymentStatusOverview(status=status, status_trigger=DeploymentStatusTrigger.AUTOSCALING,
                                    replica_states={k: v for k, v in replicas.items() if v}, message="")


def test_scaling_deployments_with_running_replicas_are_ready():
    ready, summary = readiness({
        "Ingress": overview(DeploymentStatus.HEALTHY, 1),
        "Denoiser": overview(DeploymentStatus.DOWNSCALING, 2),  # seen flapping /readyz to 503
        "Decoder": overview(DeploymentStatus.UPSCALING, 1, starting=1),
        "TextEncoder": overview(DeploymentStatus.UPDATING, 1, starting=1),  # rolling update, old one serves
    })
    assert ready, summary
    assert summary["Denoiser"] == {"status": "DOWNSCALING", "running_replicas": 2, "ready": True}


@pytest.mark.parametrize("status", [DeploymentStatus.UPDATING, DeploymentStatus.UPSCALING,
                                    DeploymentStatus.UNHEALTHY, DeploymentStatus.DEPLOY_FAILED])
def test_a_deployment_without_a_running_replica_is_not_ready(status):
    ready, summary = readiness({"Ingress": overview(DeploymentStatus.HEALTHY, 1),
                                "Decoder": overview(status, 0, starting=1)})
    assert not ready
    assert summary["Decoder"]["ready"] is False and summary["Ingress"]["ready"] is True


def test_no_deployments_is_not_ready():
    assert readiness({}) == (False, {})


def test_status_is_fetched_off_the_event_loop_and_shared():
    """The blocking status call runs on a thread: the loop keeps serving meanwhile (here it
    must, to release the fetch), and concurrent probes share one fetch, cached briefly."""
    release = threading.Event()
    calls = []
    now = [0.0]

    def fetch():
        calls.append(threading.current_thread().name)
        assert release.wait(timeout=30), "the event loop was blocked by the status call"
        return {"Ingress": overview(DeploymentStatus.DOWNSCALING, 1)}

    check = ReadinessCheck(fetch, max_age_s=1.0, clock=lambda: now[0])

    async def scenario():
        probes = [asyncio.ensure_future(check.check()) for _ in range(3)]
        await asyncio.sleep(0.05)
        release.set()  # only reachable if the loop is free while fetch() blocks
        results = await asyncio.gather(*probes)
        assert all(r[0] for r in results)
        assert await check.check() == results[0]  # cached
        now[0] = 1.5
        await check.check()  # stale: fetched again

    asyncio.run(asyncio.wait_for(scenario(), timeout=60))
    assert len(calls) == 2
    assert threading.main_thread().name not in calls
