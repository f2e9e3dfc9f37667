"""The ingress deployment: state and services of one ingress replica.

Serve builds the replica's FastAPI app from it (`__serve_build_asgi_app__` ->
`http.create_app`); the routes (`routes.py`, `openai_videos.py`) are thin and call the
services below. The pieces it holds:
  - the job store and the artifact store (started here: a store that cannot be reached,
    a bucket that does not exist or denies writes, fails the replica's start with a
    message naming it, so the application never reports ready on a broken store),
  - the generation orchestrator (text encode -> router -> denoise -> decode),
  - the job runner (claims queued jobs from the store, heartbeats, recovers, cancels).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import Request
from fastapi.responses import FileResponse, RedirectResponse, Response, StreamingResponse
from ray import serve

from ..errors import InvalidRequest, VidgenError, field_error
from ..plan import GenerationPlan, build_plan
from ..request import VideoRequest, not_yet_applied
from ..state.artifacts import artifact_key
from ..state.jobs import CANCELLED, FAILED, FINAL_STATES, JOB_ID_RE, QUEUED, SUCCEEDED, Job
from .auth import ApiKeys
from .http import DEADLINE_HEADER, create_app
from .job_runner import JobRunner
from .loop_lag import LoopLagProbe
from .orchestrator import GenerationOrchestrator
from .readiness import ReadinessCheck, serve_deployments
from .settings import ServeSettings
from .telemetry import configure_tracing

logger = logging.getLogger("vidgen_serve.ingress")


class Ingress:
    """The ingress deployment (wrapped by `serve.ingress()` below).

    Args:
        settings: serving settings.
        text_encoder, decoder: handles of the stage deployments.
        denoisers: {"primary": handle, "standby": handle} (standby optional).
        router: handle of the failover router deployment, or None to always use the primary.
    """

    async def __init__(self, settings: ServeSettings, text_encoder: Any, denoisers: dict[str, Any], decoder: Any,
                       router: Any = None):
        configure_tracing()
        self.settings = settings
        self.config = settings.model
        self.router = router
        self.keys = ApiKeys.from_env()
        self.admin_keys = ApiKeys.from_env("VIDGEN_ADMIN_KEYS", "VIDGEN_ADMIN_KEYS_FILE")
        if not len(self.keys):
            logger.error("no API keys configured (VIDGEN_API_KEYS / VIDGEN_API_KEYS_FILE): every request gets 401")
        self.metrics = _IngressMetrics()
        # Both stores are checked now: a broken one fails this replica's start, naming it.
        self.store = settings.open_job_store()
        await self.store.start()
        self.artifacts = settings.open_artifact_store()
        await self.artifacts.start()
        self.orchestrator = GenerationOrchestrator(text_encoder, denoisers, decoder, router,
                                                   retry_after_s=settings.retry_after_s)
        self.runner = JobRunner(
            self.store, self.orchestrator, settings,
            on_result=lambda status: self.metrics.requests.inc(tags={"endpoint": "jobs", "status": status}),
            on_queue_depth=self.metrics.queue_depth.set,
        )
        self.runner.start()
        self.loop_lag = LoopLagProbe(on_window=self.metrics.loop_lag.set)
        self.loop_lag.start()
        self.inflight_sync = 0  # taken and released by `http.SyncSlots`
        self._readiness: ReadinessCheck | None = None

    def __serve_build_asgi_app__(self) -> Any:
        """This replica's FastAPI app (Serve calls it after the constructor)."""
        return create_app(self)

    async def check_health(self) -> None:
        """Serve's periodic health check; also restarts the job runner if it stopped."""
        self.runner.start()
        self.loop_lag.start()

    async def shutdown(self) -> None:
        """Stop the job runner and close the store (running jobs stay `running`: their
        heartbeats stop and another replica resumes them)."""
        await self.runner.stop()
        await self.loop_lag.stop()
        await self.store.close()

    def __del__(self) -> None:
        # Serve calls this when the replica stops; the loop may be gone, so only cancel.
        runner = getattr(self, "runner", None)
        if runner is not None:
            runner.cancel_all()

    # ---- services for the routes ------------------------------------------------------------

    def plan(self, request: VideoRequest) -> GenerationPlan:
        """The plan of a validated request (profile bounds checked here: 422 naming the field)."""
        return build_plan(request, self.config)

    def deadline(self, request: Request) -> float:
        """Seconds this generation may take: the server's limit, or less if the client asks
        (`X-Vidgen-Timeout: <seconds>`, e.g. a caller with its own SLA)."""
        limit = self.settings.request_timeout_s
        raw = request.headers.get(DEADLINE_HEADER)
        if raw is None:
            return limit
        try:
            value = float(raw)
        except ValueError:
            value = float("nan")
        if not 0 < value <= limit:  # also rejects nan
            raise InvalidRequest([field_error(DEADLINE_HEADER, raw[:32], "invalid timeout header",
                                              f"seconds in (0, {limit:g}]")])
        return value

    def overloaded(self, what: str) -> VidgenError:
        self.metrics.rejected.inc(tags={"reason": what})
        return VidgenError(429, f"too many {what}; retry later", code="overloaded",
                           headers={"Retry-After": str(self.settings.retry_after_s)})

    async def submit(self, planned: list[tuple[VideoRequest, GenerationPlan]], key: str) -> list[Job]:
        """Queue jobs (all or none: the queue limit is checked for all of them first)."""
        counts = await self.store.counts()
        if counts.get(QUEUED, 0) + len(planned) > self.settings.max_queued_jobs:
            raise self.overloaded("queued jobs")
        jobs = [await self.store.create(r.model_dump(mode="json"), p.model_dump(mode="json"), key,
                                        warnings=not_yet_applied(r) + [f"prompt: {w}" for w in p.prompt_warnings])
                for r, p in planned]
        self.runner.wake()
        return jobs

    async def own_job(self, job_id: str, key: str) -> Job:
        """The caller's job (another key's job is as good as absent: 404)."""
        job = await self.store.get(job_id) if JOB_ID_RE.match(job_id) else None
        if job is None or job.key_id != key:
            raise VidgenError(404, f"no job {job_id!r}", code="not_found")
        return job

    async def cancel(self, job: Job) -> Job:
        """Cancel a queued or running job (409 if it already ended); a running one stops at the
        next step boundary on whichever replica runs it."""
        if job.state in FINAL_STATES:
            raise VidgenError(409, f"job {job.id} already {job.state}", code="already_final")
        cancelled = await self.store.cancel(job.id)
        self.runner.cancel_local(job.id)
        return cancelled or job

    async def content(self, job: Job, request: Request) -> Response:
        """The job's MP4: streamed (HTTP Range supported), or a redirect to a presigned URL.

        410 for a cancelled or failed job (it has no content and never will), 404 until then."""
        if job.state in (CANCELLED, FAILED):
            why = "was cancelled" if job.state == CANCELLED else f"failed ({job.error})"
            raise VidgenError(410, f"job {job.id} {why}: it has no content and never will; submit it again",
                              code=f"job_{job.state}")
        if job.state != SUCCEEDED:
            raise VidgenError(404, f"job {job.id} has no content (state: {job.state})", code="not_ready")
        key = job.artifact or artifact_key(job.id)  # records written before artifacts had keys
        disposition = {"Content-Disposition": f'inline; filename="{job.id}.mp4"'}
        if self.settings.artifact_redirect:
            url = await self.artifacts.presigned_url(key, self.settings.artifact_url_ttl_s)
            if url is not None:
                return RedirectResponse(url, status_code=307)
        path = self.artifacts.local_path(key)
        if path is not None:
            if not await self.artifacts.exists(key):
                raise VidgenError(404, f"the content of job {job.id} is gone from the artifact store",
                                  code="not_found")
            return FileResponse(path, media_type="video/mp4", filename=f"{job.id}.mp4",
                                content_disposition_type="inline")
        body = await self.artifacts.open(key, request.headers.get("range"))
        if body is None:
            raise VidgenError(404, f"the content of job {job.id} is gone from the artifact store", code="not_found")
        return StreamingResponse(body.chunks, status_code=body.status_code, media_type="video/mp4",
                                 headers={**body.headers, **disposition})

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Ready when every deployment of this application has a running replica (a deployment
        that is scaling still serves; see `serving.readiness`) and the job store answers."""
        info: dict[str, Any] = {}
        ready = True
        try:
            await self.store.counts()
        except VidgenError as exc:
            ready = False
            info["job_store"] = exc.message
        try:
            if self._readiness is None:
                app_name = serve.get_replica_context().app_name
                # serve.status() waits on the controller: on a thread, shared by concurrent probes.
                self._readiness = ReadinessCheck(lambda: serve_deployments(app_name))
            deployments_ready, info["deployments"] = await self._readiness.check()
            ready = ready and deployments_ready
        except Exception as exc:  # noqa: BLE001 - report, don't raise
            return False, {"status": "unknown", "error": repr(exc)}
        return ready, {"status": "ready" if ready else "not_ready", **info}


class _IngressMetrics:
    def __init__(self) -> None:
        from ray.serve import metrics

        self.requests = metrics.Counter("vidgen_requests", description="Generation requests by endpoint and status.",
                                        tag_keys=("endpoint", "status"))
        self.rejected = metrics.Counter("vidgen_rejected", description="Requests refused for capacity.",
                                        tag_keys=("reason",))
        self.queue_depth = metrics.Gauge("vidgen_jobs_queued", description="Async jobs waiting to run.")
        self.loop_lag = metrics.Gauge("vidgen_event_loop_lag_seconds",
                                      description="Worst delay of the ingress event loop waking a 10 ms timer, per second.")


# The app is built per replica (`__serve_build_asgi_app__`), with this replica's settings.
IngressApp = serve.ingress()(Ingress)
