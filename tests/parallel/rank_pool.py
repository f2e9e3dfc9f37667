"""Multiprocess test harness: local process groups of spawned ranks (gloo on CPU).

:class:`RankPool` starts N processes once and runs many cases on them: each case forms a fresh
process group of the first ``world_size`` ranks (a new port), runs a module-level function on
every rank and returns rank 0's result.  Importing torch, diffusers and DeepSpeed costs a rank
several seconds on a small machine, so the parallel tests share one pool instead of spawning
per case.  :func:`run_local_tp_group` is the one-shot form (its own pool, closed after).

:func:`peak_rss_growth` measures a rank's peak resident memory while it runs a function.
"""

from __future__ import annotations

import ctypes
import gc
import io
import itertools
import os
import queue as queue_mod
import time
import traceback
from typing import Any, Callable

import torch

__all__ = ["RankPool", "peak_rss_growth", "run_local_tp_group"]


def _dumps(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _loads(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=False)


def _serve_rank(rank: int, tasks, results) -> None:
    """A pool process: run tasks until told to stop (None)."""
    import torch.distributed as dist

    from vidgen_serve.parallel.process_group import init_process_group

    while True:
        item = tasks.get()
        if item is None:
            return
        task_id, fn, world_size, port, backend, threads, args = item
        status, payload = "error", None
        try:
            torch.set_num_threads(threads)
            init_process_group(rank, world_size, "127.0.0.1", port, backend=backend)
            result = fn(rank, world_size, *args)
            status, payload = "ok", (_dumps(result) if rank == 0 else None)
        except BaseException:  # noqa: BLE001 - reported to the parent
            payload = traceback.format_exc()
        if status == "ok":
            # A failed case leaves its peers in a collective; the parent tears the pool down.
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass
        results.put((task_id, rank, status, payload))


class RankPool:
    """``size`` spawned processes that run functions as local process groups of up to ``size`` ranks.

    ``run(fn, world_size, *args)`` calls ``fn(rank, world_size, *args)`` on ranks
    ``0..world_size-1`` inside a fresh process group (gloo by default; ``backend=None`` picks
    NCCL on CUDA) and returns rank 0's result.  ``fn`` and ``args`` must be picklable
    (module-level function).  If a rank raises or dies, or the case exceeds ``timeout``
    seconds, the pool is torn down and a ``RuntimeError`` carries the failing rank's traceback.
    """

    def __init__(self, size: int, backend: str | None = "gloo"):
        import multiprocessing as mp

        if size < 1:
            raise ValueError("size must be >= 1")
        ctx = mp.get_context("spawn")
        self.size = size
        self.backend = backend
        self._tasks = [ctx.Queue() for _ in range(size)]
        self._results = ctx.Queue()
        self._ids = itertools.count(1)
        self._procs = [ctx.Process(target=_serve_rank, args=(rank, self._tasks[rank], self._results),
                                   name=f"rank-{rank}", daemon=True) for rank in range(size)]
        self.broken: str | None = None
        for p in self._procs:
            p.start()

    def run(self, fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 600.0,
            threads_per_rank: int | None = None) -> Any:
        """Rank 0's result of ``fn(rank, world_size, *args)`` on a fresh group of ``world_size`` ranks."""
        from vidgen_serve.net import find_free_port

        if self.broken:
            raise RuntimeError(f"rank pool is broken: {self.broken}")
        if not 1 <= world_size <= self.size:
            raise ValueError(f"world_size={world_size} must be in 1..{self.size}")
        if threads_per_rank is None:
            threads_per_rank = max(1, (os.cpu_count() or 1) // world_size)
        task_id = next(self._ids)
        port = find_free_port()
        for rank in range(world_size):
            self._tasks[rank].put((task_id, fn, world_size, port, self.backend, threads_per_rank, args))

        done: dict[int, tuple[str, Any]] = {}

        def drain(wait: float) -> None:
            try:
                while True:
                    tid, rank, status, payload = self._results.get(timeout=wait)
                    if tid == task_id:
                        done[rank] = (status, payload)
                    wait = 0.05
            except queue_mod.Empty:
                pass

        def failures() -> list[str]:
            msgs = []
            # Ranks that died without reporting (segfault, os._exit, OOM kill) are usually the root
            # cause; the surviving ranks then fail with "connection reset" in their collectives.
            for r in range(world_size):
                code = self._procs[r].exitcode
                if r not in done and code is not None:
                    msgs.append(f"rank {r}/{world_size} exited with code {code} without reporting a result "
                                f"(crash/signal)")
            for r in sorted(done):
                status, payload = done[r]
                if status != "ok":
                    msgs.append(f"rank {r}/{world_size} failed:\n{payload}")
            return msgs

        deadline = time.monotonic() + timeout
        error = None
        while len(done) < world_size:
            drain(0.2)
            msgs = failures()
            if msgs:
                # Let the other ranks' reports (or deaths) land so the root cause is named first.
                time.sleep(0.5)
                drain(0.5)
                error = "\n".join(failures())
                break
            if time.monotonic() > deadline:
                error = (f"process group of {world_size} timed out after {timeout:.0f}s; "
                         f"ranks that reported: {sorted(done)}")
                break
        if error is not None:
            self.broken = error.splitlines()[0]
            self.close()
            raise RuntimeError(error)
        return _loads(done[0][1])

    def close(self) -> None:
        """Stop the processes (politely when healthy, terminated when broken). Idempotent."""
        healthy = self.broken is None
        for q, p in zip(self._tasks, self._procs):
            if healthy and p.is_alive():
                q.put(None)
        for p in self._procs:
            if healthy:
                p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        self.broken = self.broken or "closed"

    def __enter__(self) -> "RankPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_local_tp_group(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 600.0,
                       backend: str | None = "gloo", threads_per_rank: int | None = None) -> Any:
    """Run ``fn(rank, world_size, *args)`` once on ``world_size`` new processes; rank 0's result."""
    with RankPool(world_size, backend=backend) as pool:
        return pool.run(fn, world_size, *args, timeout=timeout, threads_per_rank=threads_per_rank)


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_rss_growth(fn: Callable[[], Any]) -> tuple[int, Any]:
    """(bytes by which this process's peak resident set grew while running ``fn``, ``fn()``).

    Linux only.  Before ``fn``: free what can be freed (``gc``, glibc's ``malloc_trim`` returns
    freed heap pages, so earlier cases' memory cannot be silently reused) and reset the kernel's
    peak-RSS mark (``/proc/self/clear_refs`` = 5).  After: the peak mark (``VmHWM``) minus the
    resident size before.  The peak counts every page the process had mapped at its highest
    point, file-backed pages of memory-mapped checkpoint files included, so it over-counts
    rather than under-counts what the process held.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: nothing retained to release
        pass
    with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
        fh.write("5")
    before = _status_kib("VmRSS")
    result = fn()
    peak = _status_kib("VmHWM")
    return (peak - before) * 1024, result
