"""An event-loop lag probe: how late the loop wakes a task that sleeps a fixed interval.

Anything that blocks the ingress's event loop (sync file or database I/O, CPU work)
delays every request of the replica by as long; this probe makes such stalls visible
(the `vidgen_event_loop_lag_seconds` gauge and `GET /v1/admin/event-loop`).

It also says *what* stalled the loop: a watchdog thread notices when the loop has not
woken the probe for `stall_capture_s` and records where the loop's thread was at that
moment (the worst stall's stack is returned by `take()`). A stack that ends in the
selector (`select`/`epoll`) means the loop was idle and the process was not scheduled
(CPU starvation by other processes), not that code on the loop blocked it.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import traceback


class LoopLagProbe:
    """Samples the loop's wake-up delay every `interval_s`; keeps the worst since `take()`.

    Args:
        interval_s: how long the probe sleeps between samples.
        on_window: called once per `window_s` with the worst lag of that window (e.g. a gauge's `set`).
        stall_capture_s: a watchdog thread records the loop thread's stack when the loop is this
            late (None: no watchdog).
    """

    def __init__(self, interval_s: float = 0.01, on_window=None, window_s: float = 1.0,
                 stall_capture_s: float | None = 0.04):
        self.interval_s = interval_s
        self.window_s = window_s
        self.stall_capture_s = stall_capture_s
        self._on_window = on_window or (lambda lag: None)
        self._task: asyncio.Task | None = None
        self._worst = 0.0
        self._since = time.monotonic()
        self.samples = 0
        self._due = float("inf")  # perf_counter time by which the probe should have woken
        self._loop_thread: int | None = None
        self._watchdog: threading.Thread | None = None
        self._stop = threading.Event()
        self._stall_stack: list[str] = []
        self._stall_stack_lag = 0.0

    def start(self) -> None:
        """Start sampling on the running loop (idempotent)."""
        if self._task is None or self._task.done():
            self._loop_thread = threading.get_ident()
            self._task = asyncio.get_running_loop().create_task(self._run())
        if self.stall_capture_s is not None and (self._watchdog is None or not self._watchdog.is_alive()):
            self._stop.clear()
            self._watchdog = threading.Thread(target=self._watch, name="loop-lag-watchdog", daemon=True)
            self._watchdog.start()

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        window_worst, window_start = 0.0, time.perf_counter()
        while True:
            t0 = time.perf_counter()
            self._due = t0 + self.interval_s
            await asyncio.sleep(self.interval_s)
            now = time.perf_counter()
            self._due = float("inf")
            lag = max(0.0, now - t0 - self.interval_s)
            self.samples += 1
            self._worst = max(self._worst, lag)
            window_worst = max(window_worst, lag)
            if now - window_start >= self.window_s:
                self._on_window(window_worst)
                window_worst, window_start = 0.0, now

    def _watch(self) -> None:
        """Watchdog thread: while the loop is `stall_capture_s` late or more, record its thread's stack
        (re-sampled as the stall goes on: what is kept is where the loop was in the longest stall)."""
        while not self._stop.wait(self.stall_capture_s / 2):
            late = time.perf_counter() - self._due
            if late < self.stall_capture_s or late < self._stall_stack_lag:
                continue
            frame = sys._current_frames().get(self._loop_thread)
            if frame is not None:
                self._stall_stack = traceback.format_stack(frame)[-12:]
                self._stall_stack_lag = late

    def take(self) -> dict:
        """The longest stall since the last call (and over how long), then start over; with the
        stack of the loop's thread during the worst stall the watchdog caught (if any)."""
        now = time.monotonic()
        out = {"max_lag_s": self._worst, "window_s": now - self._since, "samples": self.samples}
        if self._stall_stack:
            out["stall_stack"] = "".join(self._stall_stack)
            out["stall_stack_late_s"] = self._stall_stack_lag
        self._worst, self._since, self.samples = 0.0, now, 0
        self._stall_stack, self._stall_stack_lag = [], 0.0
        return out
