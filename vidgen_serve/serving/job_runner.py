"""The job runner: claims queued jobs from the store and runs them through the orchestrator.

One runner per ingress replica. Every tick (`poll_interval_s`, or at once when a job is
submitted here) it:
  1. stops local jobs whose cancel was requested (through any replica),
  2. every `job_heartbeat_s`: heartbeats its running jobs (a job it no longer holds, because
     another replica recovered it after a stall, is dropped here without a result), and
     recovers jobs whose owner went silent (the store makes that atomic: one replica wins),
  3. claims as many queued jobs as it has free slots (`max_running_jobs`; 0 = accept only).

A job ends succeeded only after the Decoder has stored its MP4 (`finish` carries the
artifact key); otherwise failed with the reason, or cancelled. A replica that stops while
running jobs leaves them `running`: their heartbeats stop and a live replica resumes them
from their stored plan (same seed, same frames).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

from ..errors import GenerationCancelled, VidgenError
from ..plan import GenerationPlan
from ..state.artifacts import artifact_key
from ..state.jobs import CANCELLED, FAILED, SUCCEEDED, Job, JobStore, StoreUnavailable
from .progress import DEFAULT_SHARES, GenerationProgress

logger = logging.getLogger("vidgen_serve.jobs")

CANCELLED_ERROR = "cancelled by the client"


class JobLost(GenerationCancelled):
    """This replica no longer holds the job (another one recovered it): stop without a result."""


class JobRunner:
    """Runs async jobs from a `JobStore` on one replica.

    Args:
        store: the (started) job store.
        orchestrator: a `GenerationOrchestrator` (or anything with its `generate`).
        settings: `ServeSettings` (max_running_jobs, job_heartbeat_s, job_stale_after_s,
            max_job_attempts, request_timeout_s).
        owner: this replica's owner id in the store (default: a fresh UUID).
        on_result: called with a status tag ("ok", "cancelled", "504", "500", ...) per finished job.
        poll_interval_s: how often the store is polled for work and cancel flags.
    """

    def __init__(self, store: JobStore, orchestrator: Any, settings: Any, owner: str | None = None,
                 on_result: Any = None, on_queue_depth: Any = None, poll_interval_s: float = 0.2):
        self.store = store
        self.orchestrator = orchestrator
        self.settings = settings
        self.owner = owner or uuid.uuid4().hex
        self.max_running = settings.max_running_jobs
        self.poll_interval_s = poll_interval_s
        self._on_result = on_result or (lambda status: None)
        self._on_queue_depth = on_queue_depth or (lambda depth: None)
        self._tasks: dict[str, asyncio.Task] = {}
        self._stop_reason: dict[str, str] = {}
        self._loop_task: asyncio.Task | None = None
        self._stopping = False
        self._wake = asyncio.Event()
        self._last_beat = float("-inf")
        self._store_down_logged = False

    # ---- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Start the loop on the running event loop (idempotent; restarts it if it died)."""
        self._stopping = False
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Stop the loop and this replica's running jobs (left `running` for recovery elsewhere)."""
        self._stopping = True  # the loop also ends on this, should a library swallow the cancel
        tasks = [t for t in (self._loop_task, *self._tasks.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def cancel_all(self) -> None:
        """Cancel the loop and the running jobs without waiting (the replica is going away)."""
        for task in (self._loop_task, *self._tasks.values()):
            if task is not None:
                task.cancel()

    def wake(self) -> None:
        """Claim now (a job was just submitted here) instead of at the next tick."""
        self._wake.set()

    @property
    def running(self) -> list[str]:
        """Ids of the jobs this replica runs now."""
        return list(self._tasks)

    def cancel_local(self, job_id: str) -> bool:
        """Stop a job running here at once (its cancel flag is already in the store)."""
        return self._stop(job_id, "cancel")

    def _stop(self, job_id: str, reason: str) -> bool:
        task = self._tasks.get(job_id)
        if task is None or task.done():
            return False
        self._stop_reason.setdefault(job_id, reason)
        task.cancel()
        return True

    # ---- the loop ------------------------------------------------------------------------

    async def _loop(self) -> None:
        # Not `while True`: a cancel can be lost inside a tick (seen about 1 stop in 12 here: the task
        # stayed `cancelling` and kept ticking, so stop() never returned), so the loop also ends on
        # stop()'s flag, and on a cancel request still pending after a tick.
        while not self._stopping:
            try:
                await self.tick()
                if self._store_down_logged:
                    logger.warning("job store %s is reachable again", self.store.url)
                    self._store_down_logged = False
            except StoreUnavailable as exc:
                if not self._store_down_logged:  # one line per outage, not one per tick
                    logger.error("job runner: %s", exc.message)
                    self._store_down_logged = True
            except Exception:  # keep the loop alive; the next tick retries
                logger.exception("job runner tick failed")
            task = asyncio.current_task()
            if task is not None and getattr(task, "cancelling", lambda: 0)():  # Python >= 3.11
                raise asyncio.CancelledError
            if self._stopping:
                return
            self._wake.clear()
            # asyncio.wait, not wait_for: wait_for can swallow a cancel that arrives as its
            # timeout fires (Python < 3.12), and stop() would then wait forever.
            waiter = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait({waiter}, timeout=self.poll_interval_s)
            finally:
                waiter.cancel()

    async def tick(self) -> None:
        """One round: cancel flags, heartbeat + recovery (when due), claims."""
        if self._tasks:
            for job_id in await self.store.cancel_requested(list(self._tasks)):
                self._stop(job_id, "cancel")
        now = time.monotonic()
        if now - self._last_beat >= self.settings.job_heartbeat_s:
            self._last_beat = now
            mine = list(self._tasks)
            held = await self.store.heartbeat(self.owner, mine)
            for job_id in set(mine) - held:
                logger.warning("job %s was recovered by another replica; dropping this run", job_id)
                self._stop(job_id, "lost")
            requeued, failed = await self.store.recover_stale(self.settings.job_stale_after_s,
                                                              self.settings.max_job_attempts)
            for job_id in requeued:
                logger.warning("job %s: its replica stopped; re-queued to resume from its plan", job_id)
            for job_id in failed:
                logger.error("job %s: its replica stopped and it is out of attempts; failed", job_id)
            self._on_queue_depth(await self.store.queue_depth())
        free = self.max_running - len(self._tasks)
        if free > 0:
            for job in await self.store.claim(self.owner, free):
                task = asyncio.get_running_loop().create_task(self._run(job))
                self._tasks[job.id] = task
                task.add_done_callback(lambda _t, jid=job.id: self._forget(jid))

    def _forget(self, job_id: str) -> None:
        self._tasks.pop(job_id, None)
        self._stop_reason.pop(job_id, None)

    # ---- one job ---------------------------------------------------------------------------

    async def _progress(self, job_id: str, **fields: Any) -> None:
        try:
            held = await self.store.update(job_id, self.owner, **fields)
        except StoreUnavailable as exc:  # progress is best effort; the result is not
            logger.warning("job %s: progress not stored (%s)", job_id, exc.message)
            return
        if not held:
            raise JobLost(f"job {job_id} is no longer held by this replica")

    async def _finish(self, job_id: str, state: str, status: str, **fields: Any) -> None:
        """Record the result; retried while the store is down (the job keeps its heartbeat),
        given up after `job_stale_after_s` (then another replica resumes it)."""
        deadline = time.monotonic() + self.settings.job_stale_after_s
        while True:
            try:
                if not await self.store.finish(job_id, self.owner, state, **fields):
                    logger.warning("job %s: result not recorded, another replica holds it now", job_id)
                    return
                self._on_result(status)
                return
            except StoreUnavailable as exc:
                if time.monotonic() > deadline:
                    logger.error("job %s: could not record its result (%s); it will be resumed", job_id,
                                 exc.message)
                    return
                await asyncio.sleep(0.5)

    async def _run(self, job: Job) -> None:
        key = artifact_key(job.id)
        # One overall fraction + ETA across the stages, weighted by the stage shares the
        # orchestrator learned from the generations it finished.
        shares = getattr(getattr(self.orchestrator, "stage_shares", None), "shares", DEFAULT_SHARES)
        progress = GenerationProgress(shares)
        stage_now = ["text_encode"]

        async def on_stage(stage: str) -> None:
            stage_now[0] = stage
            await self._progress(job.id, stage=stage, progress=progress.update(stage))

        async def on_progress(event: dict) -> None:
            await self._progress(job.id, progress=progress.update(stage_now[0], event))

        timeout = self.settings.request_timeout_s
        try:
            plan = GenerationPlan.model_validate(job.plan)
            result = await asyncio.wait_for(
                self.orchestrator.generate(plan, artifact_key=key, on_stage=on_stage, on_progress=on_progress),
                timeout=timeout)
        except JobLost:
            return
        except asyncio.CancelledError:
            if self._stop_reason.get(job.id) == "cancel":
                await self._finish(job.id, CANCELLED, "cancelled", error=CANCELLED_ERROR)
                return
            if self._stop_reason.get(job.id) == "lost":
                return
            raise  # the replica is stopping: the job stays running; another replica resumes it
        except asyncio.TimeoutError:
            await self._finish(job.id, FAILED, "504", error=f"exceeded the {timeout:g}s deadline")
        except VidgenError as exc:
            await self._finish(job.id, FAILED, str(exc.status_code), error=exc.message)
        except Exception:
            logger.exception("job %s failed", job.id)
            await self._finish(job.id, FAILED, "500", error="internal error")
        else:
            # The Decoder returned only after the artifact store had the whole file.
            try:
                await self._progress(job.id, progress=progress.finished())
            except JobLost:  # another replica holds it now: it records the result
                return
            await self._finish(job.id, SUCCEEDED, "ok", timings=result.timings, artifact=result.artifact,
                               quality=getattr(result, "quality", None) or None)
