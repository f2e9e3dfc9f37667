"""The ingress's event-loop lag probe: a blocking call on the loop is measured and located."""

from __future__ import annotations

import asyncio
import threading
import time

from vidgen_serve.serving.loop_lag import LoopLagProbe


def _blocks_the_loop(release: threading.Event) -> None:
    """Sync work on the loop's thread (what must never happen in a handler): held until released."""
    release.wait(5)


def test_probe_measures_a_stall_and_catches_where_the_loop_was():
    release = threading.Event()

    def release_when_caught(probe):
        # Hold the block until the watchdog has caught the loop inside it (no guess of how long that takes).
        while "_blocks_the_loop" not in "".join(probe._stall_stack) and not release.is_set():
            time.sleep(0.005)
        release.set()

    async def main():
        probe = LoopLagProbe(interval_s=0.005, stall_capture_s=0.02)
        # Started before the probe: starting a thread from the loop is itself a stall.
        releaser = threading.Thread(target=release_when_caught, args=(probe,), daemon=True)
        releaser.start()
        probe.start()
        await asyncio.sleep(0.05)  # the probe is sampling
        t0 = time.perf_counter()
        _blocks_the_loop(release)
        blocked = time.perf_counter() - t0
        await asyncio.sleep(0.02)  # the probe wakes (late) and records the lag
        out = probe.take()
        await probe.stop()
        return out, blocked

    out, blocked = asyncio.run(main())
    assert out["samples"] > 0
    assert out["max_lag_s"] >= 0.02 and out["max_lag_s"] >= blocked - 0.01
    assert "_blocks_the_loop" in out["stall_stack"]
    assert out["stall_stack_late_s"] >= 0.02


def test_probe_without_stall_reports_no_stack():
    async def main():
        probe = LoopLagProbe(interval_s=0.005, stall_capture_s=5.0)
        probe.start()
        await asyncio.sleep(0.03)
        out = probe.take()
        await probe.stop()
        return out

    out = asyncio.run(main())
    assert "stall_stack" not in out and out["samples"] > 0


def test_no_route_or_dependency_runs_on_the_thread_pool():
    """FastAPI runs a plain `def` endpoint or dependency on its thread pool; starting a new pool thread
    blocks the loop until that thread runs (the ingress's worst stall under polling load): every
    route and dependency of the ingress is a coroutine."""
    import inspect

    from fastapi.routing import APIRoute

    from vidgen_serve.serving import openai_videos, routes

    def sync_calls(dependant, where):
        call = dependant.call
        if call is not None:
            fn = call if inspect.isfunction(call) or inspect.ismethod(call) else getattr(call, "__call__", call)
            if not inspect.iscoroutinefunction(fn):
                yield f"{where}: {getattr(call, '__name__', call)!r}"
        for sub in dependant.dependencies:
            yield from sync_calls(sub, where)

    found = [bad for router in (routes.router, openai_videos.router) for route in router.routes
             if isinstance(route, APIRoute) for bad in sync_calls(route.dependant, route.path)]
    assert routes.router.routes and not found, found
