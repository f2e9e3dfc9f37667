"""An event-loop lag probe: how late the loop wakes a task that sleeps a fixed interval.

Anything that blocks the ingress's event loop (sync file or database I/O, CPU work)
delays every request of the replica by as long; this probe makes such stalls visible
(the `vidgen_event_loop_lag_seconds` gauge and `GET /v1/admin/event-loop`).
"""

from __future__ import annotations

import asyncio
import time


class LoopLagProbe:
    """Samples the loop's wake-up delay every `interval_s`; keeps the worst since `take()`.

    Args:
        interval_s: how long the probe sleeps between samples.
        on_window: called once per `window_s` with the worst lag of that window (e.g. a gauge's `set`).
    """

    def __init__(self, interval_s: float = 0.01, on_window=None, window_s: float = 1.0):
        self.interval_s = interval_s
        self.window_s = window_s
        self._on_window = on_window or (lambda lag: None)
        self._task: asyncio.Task | None = None
        self._worst = 0.0
        self._since = time.monotonic()
        self.samples = 0

    def start(self) -> None:
        """Start sampling on the running loop (idempotent)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        window_worst, window_start = 0.0, time.perf_counter()
        while True:
            t0 = time.perf_counter()
            await asyncio.sleep(self.interval_s)
            now = time.perf_counter()
            lag = max(0.0, now - t0 - self.interval_s)
            self.samples += 1
            self._worst = max(self._worst, lag)
            window_worst = max(window_worst, lag)
            if now - window_start >= self.window_s:
                self._on_window(window_worst)
                window_worst, window_start = 0.0, now

    def take(self) -> dict[str, float]:
        """The longest stall since the last call (and over how long), then start over."""
        now = time.monotonic()
        out = {"max_lag_s": self._worst, "window_s": now - self._since, "samples": self.samples}
        self._worst, self._since, self.samples = 0.0, now, 0
        return out
