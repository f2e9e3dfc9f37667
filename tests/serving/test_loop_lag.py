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
    async def main():
        probe = LoopLagProbe(interval_s=0.005, stall_capture_s=0.02)
        probe.start()
        await asyncio.sleep(0.05)  # the probe is sampling
        release = threading.Event()
        # Release the block only once the watchdog has caught it (no guess of how long that takes).
        def release_when_caught():
            while not probe._stall_stack and not release.is_set():
                time.sleep(0.005)
            release.set()
        threading.Thread(target=release_when_caught, daemon=True).start()
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
