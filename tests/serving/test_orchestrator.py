"""The generation orchestrator and the job runner as plain classes: fake deployment handles,
a real SQLite job store, no Ray. Work is held with events, never timed."""

from __future__ import annotations

import asyncio
import pytest
from fake_handles import QUALITY, make_stages, records

from vidgen_serve.config import AppConfig
from vidgen_serve.errors import GenerationCancelled, VidgenError
from vidgen_serve.plan import build_plan
from vidgen_serve.request import parse_request
from vidgen_serve.serving.job_runner import CANCELLED_ERROR, JobRunner
from vidgen_serve.serving.orchestrator import GenerationResult
from vidgen_serve.serving.settings import ServeSettings
from vidgen_serve.state.jobs import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, open_job_store

SMALL = {"prompt": "a red fox", "duration": 1, "resolution": "480p", "num_inference_steps": 2, "seed": 3}


@pytest.fixture(scope="module")
def plan():
    return build_plan(parse_request(SMALL), AppConfig())


def test_generate_runs_the_stages_in_order(plan):
    calls: list = []
    orch = make_stages(calls)
    stages, progress = [], []

    async def on_stage(s):
        stages.append(s)

    async def on_progress(e):
        progress.append(e.get("step", e.get("phase")))

    result = asyncio.run(orch.generate(plan, on_stage=on_stage, on_progress=on_progress))
    assert result.mp4 == b"MP4LATENTS" and result.artifact is None and result.denoiser == "primary"
    # Denoising steps, then the Decoder's phases (streamed through).
    assert stages == ["text_encode", "denoise", "decode"] and progress == [1, 2, "vae_decode", "encode"]
    assert {"text_encode", "denoise", "vae_decode", "encode", "total"} <= set(result.timings)
    assert result.quality == QUALITY  # the Decoder's metrics of the video, passed through
    names = [c[0] for c in calls]
    assert names.index("encode") < names.index("denoise") < names.index("decode")
    assert records(calls) == [("primary", True)]
    # Async jobs: the Decoder stores the MP4 under the key; no bytes come back.
    stored = asyncio.run(orch.generate(plan, artifact_key="k.mp4"))
    assert stored.mp4 is None and stored.artifact == "k.mp4" and stored.timings["store"] == 0.001
    assert stored.quality == QUALITY
    assert ("decode_to_store", ) == tuple(c[0] for c in calls if c[0] == "decode_to_store")
    # Progress events are asked for only when someone listens (each is a round trip through Ray).
    assert [args[3] for name, args in calls if name == "denoise"] == [True, False]
    assert [args[-1] for name, args in calls if name in ("decode", "decode_to_store")] == [True, False]


def test_a_failed_denoise_is_retried_on_the_other_target(plan):
    calls: list = []

    async def broken(plan, embeddings, carrier, progress=True):
        raise VidgenError(503, "primary is down", code="stage_unavailable")
        yield  # an async generator, like the real one

    orch = make_stages(calls, denoise=broken)
    result = asyncio.run(orch.generate(plan))
    assert result.denoiser == "standby" and result.mp4 == b"MP4LATENTS"
    assert records(calls) == [("primary", False), ("standby", True)]  # the failure counted against the primary


def test_client_errors_are_not_retried_and_cancel_stops_the_stream(plan):
    calls: list = []

    async def bad_request(plan, embeddings, carrier, progress=True):
        raise VidgenError(422, "bad", code="invalid_request")
        yield

    with pytest.raises(VidgenError) as info:
        asyncio.run(make_stages(calls, denoise=bad_request).generate(plan))
    assert info.value.status_code == 422
    assert records(calls) == [("primary", False)]

    calls.clear()

    async def stop(event):
        raise GenerationCancelled("cancelled at step 1")

    with pytest.raises(GenerationCancelled):
        asyncio.run(make_stages(calls).generate(plan, on_progress=stop))
    streams = [c[1] for c in calls if c[0] == "stream"]
    assert len(streams) == 1 and streams[0].cancelled  # the replica's loop is told to stop
    assert not [c for c in calls if c[0] in ("record", "decode")]  # a cancel is not the denoiser's fault


# ---- the job runner over a real store ------------------------------------------------------


class HeldOrchestrator:
    """Generates only when released; records what it was asked."""

    def __init__(self, fail: VidgenError | None = None):
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.fail = fail
        self.cancelled = False
        self.keys: list[str] = []

    async def generate(self, plan, *, artifact_key=None, on_stage=None, on_progress=None):
        self.keys.append(artifact_key)
        await on_stage("denoise")
        await on_progress({"step": 1, "steps": 2, "window": 1, "windows": 1})
        self.started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        if self.fail:
            raise self.fail
        return GenerationResult(timings={"total": 0.5}, denoiser="primary", text_cache="miss",
                                artifact=artifact_key, quality=dict(QUALITY))


def _settings(tmp_path, **kw) -> ServeSettings:
    return ServeSettings(state_dir=tmp_path, job_heartbeat_s=0.05, job_stale_after_s=0.2, **kw)


async def _tick_until(runner, condition, ticks: int = 200):
    for _ in range(ticks):
        await runner.tick()
        if await condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


def test_runner_runs_a_job_to_a_stored_artifact(tmp_path, plan):
    async def body():
        settings = _settings(tmp_path)
        store = settings.open_job_store()
        await store.start()
        job = await store.create({}, plan.model_dump(mode="json"), "k")
        orch = HeldOrchestrator()
        results = []
        runner = JobRunner(store, orch, settings, on_result=results.append)
        await runner.tick()
        await orch.started.wait()
        seen = await store.get(job.id)
        assert seen.state == RUNNING and seen.stage == "denoise" and seen.progress["step"] == 1
        assert seen.owner == runner.owner and runner.running == [job.id]
        orch.release.set()
        await _tick_until(runner, lambda: _state_is(store, job.id, SUCCEEDED))
        done = await store.get(job.id)
        assert done.artifact == f"{job.id}.mp4" == orch.keys[0] and done.timings == {"total": 0.5}
        assert done.quality == QUALITY and done.public()["quality"] == QUALITY
        assert results == ["ok"]
        await store.close()

    asyncio.run(body())


async def _state_is(store, job_id, state):
    return (await store.get(job_id)).state == state


def test_paused_runner_claims_nothing(tmp_path, plan):
    async def body():
        settings = _settings(tmp_path, max_running_jobs=0)
        store = settings.open_job_store()
        await store.start()
        await store.create({}, plan.model_dump(mode="json"), "k")
        runner = JobRunner(store, HeldOrchestrator(), settings)
        for _ in range(3):
            await runner.tick()
        assert await store.counts() == {QUEUED: 1, RUNNING: 0} and runner.running == []
        await store.close()

    asyncio.run(body())


def test_cancel_through_another_replica_and_failures(tmp_path, plan):
    async def body():
        settings = _settings(tmp_path)
        store, other = settings.open_job_store(), settings.open_job_store()
        await store.start()
        await other.start()
        job = await store.create({}, plan.model_dump(mode="json"), "k")
        orch = HeldOrchestrator()
        runner = JobRunner(store, orch, settings)
        await runner.tick()
        await orch.started.wait()
        flagged = await other.cancel(job.id)  # the DELETE arrives at the other replica
        assert flagged.state == RUNNING and flagged.cancel_requested
        await _tick_until(runner, lambda: _state_is(store, job.id, CANCELLED))
        assert orch.cancelled and (await store.get(job.id)).error == CANCELLED_ERROR

        failing = HeldOrchestrator(fail=VidgenError(503, "storing x.mp4 in s3://b/: access denied"))
        failing.release.set()
        job2 = await store.create({}, plan.model_dump(mode="json"), "k")
        runner2 = JobRunner(store, failing, settings)
        await _tick_until(runner2, lambda: _state_is(store, job2.id, FAILED))
        failed = await store.get(job2.id)
        assert failed.error == "storing x.mp4 in s3://b/: access denied" and failed.artifact is None
        await store.close()
        await other.close()

    asyncio.run(body())


def test_a_stalled_replica_loses_its_job_to_exactly_one_other(tmp_path, plan):
    async def body():
        settings = _settings(tmp_path)
        store_a, store_b = settings.open_job_store(), settings.open_job_store()
        await store_a.start()
        await store_b.start()
        job = await store_a.create({}, plan.model_dump(mode="json"), "k")
        slow, fast = HeldOrchestrator(), HeldOrchestrator()
        fast.release.set()
        a = JobRunner(store_a, slow, settings, owner="replica-a")
        b = JobRunner(store_b, fast, settings, owner="replica-b")
        await a.tick()
        await slow.started.wait()
        # Replica A stalls (no ticks, so no heartbeats) past job_stale_after_s; B recovers and runs it.
        await asyncio.sleep(0.3)
        await _tick_until(b, lambda: _state_is(store_b, job.id, SUCCEEDED))
        assert (await store_b.get(job.id)).attempts == 2
        # A wakes up: its heartbeat shows it lost the job; its run stops without a result.
        await a.tick()
        await asyncio.sleep(0)
        assert slow.cancelled and a.running == []
        final = await store_a.get(job.id)
        assert final.state == SUCCEEDED and final.owner == "replica-b"
        await store_a.close()
        await store_b.close()

    asyncio.run(body())


def test_a_job_whose_plan_no_longer_validates_fails_with_a_reason(tmp_path):
    async def body():
        settings = _settings(tmp_path)
        store = settings.open_job_store()
        await store.start()
        job = await store.create({}, {"seed": 1}, "k")  # e.g. written by an older version
        runner = JobRunner(store, HeldOrchestrator(), settings)
        await _tick_until(runner, lambda: _state_is(store, job.id, FAILED))
        assert (await store.get(job.id)).error == "internal error"
        await store.close()

    asyncio.run(body())


def test_stop_returns_when_a_tick_swallows_the_cancel(tmp_path):
    """stop() ends the runner's loop even when the cancel lands in a store call that swallows it (a
    client library retrying on CancelledError): the loop saw it as a finished tick and kept polling,
    so stop() never returned (a replica's shutdown hung; seen about once in 12 in the two-replica test)."""
    async def body():
        settings = _settings(tmp_path)
        store = settings.open_job_store()
        await store.start()
        inside, swallowed = asyncio.Event(), []
        real_queue_depth = store.queue_depth

        async def queue_depth():  # the tick's last store call, made when the heartbeat is due
            inside.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if swallowed:  # only the first cancel is lost: without the fix stop() times out, not hangs
                    raise
                swallowed.append(True)  # ... and carries on as if nothing happened
            return await real_queue_depth()

        store.queue_depth = queue_depth
        runner = JobRunner(store, HeldOrchestrator(), settings, poll_interval_s=0.01)
        runner.start()
        await asyncio.wait_for(inside.wait(), 30)
        await asyncio.wait_for(runner.stop(), 10)
        assert swallowed and runner._loop_task.done()
        await store.close()

    asyncio.run(body())
