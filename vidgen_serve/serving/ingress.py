"""The HTTP ingress: auth, validation, the request/job lifecycle, one error shape.

Runs as a Ray Serve deployment (`serve.ingress` over the FastAPI app below). A request
is validated and planned here, once; the plan then travels with the tensors through the
text encoder, denoiser and decoder deployments.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from typing import Any, Awaitable, Callable

from fastapi import FastAPI, Request
from ray import serve
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config import ModelProfile
from ..errors import GenerationCancelled, InvalidRequest, VidgenError, error_body, field_error
from ..plan import GenerationPlan, build_plan
from ..request import VideoRequest, not_yet_applied, parse_request, request_schema
from .auth import ApiKeys
from .jobs import CANCELLED, FAILED, FINAL_STATES, QUEUED, SUCCEEDED, LocalArtifactStore, SQLiteJobStore
from .progress import GenerationProgress, StageShares
from .readiness import ReadinessCheck, serve_deployments
from .settings import ServeSettings
from .telemetry import carrier_for_current_span, configure_tracing, tracer

logger = logging.getLogger("vidgen_serve.ingress")

JOB_ID_RE = re.compile(r"^[0-9a-f]{32}$")
DEADLINE_HEADER = "X-Vidgen-Timeout"
WARNINGS_HEADER = "X-Vidgen-Warnings"
STAGE_ORDER = ("text_encode", "denoise", "vae_decode", "encode")

app = FastAPI(
    title="vidgen-serve",
    version="0.1.0",
    description="Text-to-video generation (Wan 2.1) on Ray Serve. Authenticate with `Authorization: Bearer <key>`.",
)


def _openapi() -> dict[str, Any]:
    # Request bodies are read by hand (size limit, one error shape), so the OpenAPI
    # document gets the request models added explicitly, bounded by the active profile
    # (`app.state.profile`, set by the replica; Serve serves a frozen copy of `app` whose
    # `openapi` is this function, so the module's `app` is where replica state reaches it).
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    profile: ModelProfile | None = getattr(app.state, "profile", None)
    models = dict(request_schema(profile, ref_template="#/components/schemas/{model}"))
    components.update(models.pop("$defs", {}))
    components["VideoRequest"] = models
    app.openapi_schema = schema
    return schema


app.openapi = _openapi  # type: ignore[method-assign]


def _body_doc(schema_ref: dict[str, Any]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema_ref}}}}


VIDEO_REQUEST_DOC = _body_doc({"$ref": "#/components/schemas/VideoRequest"})
BATCH_DOC = _body_doc(
    {"type": "object", "properties": {"requests": {"type": "array", "items": {"$ref": "#/components/schemas/VideoRequest"}}},
     "required": ["requests"], "additionalProperties": False}
)
ANALYZE_DOC = _body_doc(
    {"type": "object", "properties": {"prompt": {"type": "string", "maxLength": 2000},
                                      "negative_prompt": {"type": "string", "maxLength": 2000},
                                      "style": {"type": "string"}},
     "required": ["prompt"], "additionalProperties": False}
)


def _request_id(request: Request) -> str:
    """The request id Ray Serve's proxy put on the request (and echoes in X-Request-ID)."""
    rid = getattr(request.state, "request_id", None)
    if rid is None:
        rid = request.headers.get("x-request-id", "")[:64] or uuid.uuid4().hex
        request.state.request_id = rid
    return rid


def _error_response(exc: VidgenError, request: Request) -> JSONResponse:
    rid = _request_id(request)
    return JSONResponse(error_body(exc, rid), status_code=exc.status_code, headers=exc.headers)


@app.exception_handler(VidgenError)
async def _vidgen_error(request: Request, exc: VidgenError) -> JSONResponse:
    return _error_response(exc, request)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return _error_response(VidgenError(exc.status_code, str(exc.detail), code=code), request)


@app.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    rid = _request_id(request)
    logger.exception("internal error (request %s)", rid)
    return _error_response(VidgenError(500, "internal error; see the server logs for this request id",
                                       code="internal"), request)


def server_timing(timings: dict[str, float], extra: dict[str, str] | None = None) -> str:
    """`Server-Timing` header value: stage durations in milliseconds (+ descriptive entries)."""
    parts = [f"{name};dur={timings[name] * 1000:.1f}" for name in (*STAGE_ORDER, "total") if name in timings]
    parts += [f'{name};desc="{value}"' for name, value in (extra or {}).items()]
    return ", ".join(parts)


def _map_stage_error(stage: str, exc: BaseException, retry_after_s: int) -> VidgenError:
    """Downstream failures as client-safe errors (the full error is logged); 503s say when to retry."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    retry = {"Retry-After": str(retry_after_s)}
    if isinstance(exc, VidgenError):
        # Raised in a replica, it arrives as RayTaskError(VidgenError): answer with the original.
        cause = getattr(exc, "cause", None)
        return cause if isinstance(cause, VidgenError) else exc
    if isinstance(exc, BackPressureError):
        return VidgenError(503, f"the {stage} stage is at capacity; retry later", code="overloaded", headers=retry)
    if isinstance(exc, (RayActorError, ActorDiedError, ActorUnavailableError, DeploymentUnavailableError)):
        logger.error("%s stage replica failed: %s", stage, exc)
        return VidgenError(503, f"the {stage} stage failed (its replica stopped); retry", code="stage_unavailable",
                           headers=retry)
    logger.error("%s stage error: %r", stage, exc)
    return VidgenError(500, f"the {stage} stage failed", code="stage_error")


class Ingress:
    """The ingress deployment (wrapped by `serve.ingress(app)` in the builder).

    Args:
        settings: serving settings.
        text_encoder, decoder: handles of the stage deployments.
        denoisers: {"primary": handle, "standby": handle} (standby optional).
        router: handle of the failover router deployment, or None to always use the primary.
    """

    def __init__(self, settings: ServeSettings, text_encoder: Any, denoisers: dict[str, Any], decoder: Any,
                 router: Any = None):
        configure_tracing()
        self.settings = settings
        self.config = settings.model
        self.text_encoder = text_encoder
        self.denoisers = denoisers
        self.decoder = decoder
        self.router = router
        self.keys = ApiKeys.from_env()
        self.admin_keys = ApiKeys.from_env("VIDGEN_ADMIN_KEYS", "VIDGEN_ADMIN_KEYS_FILE")
        if not len(self.keys):
            logger.error("no API keys configured (VIDGEN_API_KEYS / VIDGEN_API_KEYS_FILE): every request gets 401")
        self.store = SQLiteJobStore(settings.jobs_db_path)
        self.artifacts = LocalArtifactStore(settings.artifacts_path)
        self.owner = uuid.uuid4().hex
        self._inflight_sync = 0
        self._stage_shares = StageShares()
        self._readiness: ReadinessCheck | None = None
        app.state.profile = self.config.model_profile
        app.openapi_schema = None  # rebuilt for this replica's profile
        self._job_tasks: dict[str, asyncio.Task] = {}
        self._worker: asyncio.Task | None = None
        self._metrics = _IngressMetrics()
        try:
            self._ensure_worker()
        except RuntimeError:  # no running loop yet: started on the first request
            pass

    # ---- auth -------------------------------------------------------------------------

    def _auth(self, request: Request) -> str:
        key = self.keys.check(request.headers.get("authorization"))
        if key is None:
            raise VidgenError(401, "missing or invalid API key (use 'Authorization: Bearer <key>')",
                              code="unauthorized", headers={"WWW-Authenticate": "Bearer"})
        return key

    def _admin(self, request: Request) -> None:
        # An admin key need not also be an API key (VIDGEN_ADMIN_KEYS is its own list).
        if self.admin_keys.check(request.headers.get("authorization")) is not None:
            return
        self._auth(request)  # no/invalid key: 401; a valid non-admin key: 403
        raise VidgenError(403, "this endpoint needs an admin key (VIDGEN_ADMIN_KEYS)", code="forbidden")

    async def _json_body(self, request: Request) -> Any:
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise VidgenError(413, f"request body larger than {limit} bytes", code="payload_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise VidgenError(413, f"request body larger than {limit} bytes", code="payload_too_large")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks) or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InvalidRequest([field_error("body", None, f"not valid JSON: {exc}")]) from None

    def _plan(self, body: Any) -> tuple[VideoRequest, GenerationPlan]:
        if not isinstance(body, dict):
            raise InvalidRequest([field_error("body", None, "must be a JSON object", "VideoRequest")])
        request = parse_request(body, self.config.model_profile)
        return request, build_plan(request, self.config)

    def _deadline(self, request: Request) -> float:
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

    def _overloaded(self, what: str) -> VidgenError:
        self._metrics.rejected.inc(tags={"reason": what})
        return VidgenError(429, f"too many {what}; retry later", code="overloaded",
                           headers={"Retry-After": str(self.settings.retry_after_s)})

    # ---- the pipeline -----------------------------------------------------------------

    async def _call(self, stage: str, awaitable: Awaitable) -> Any:
        try:
            return await awaitable
        except (asyncio.CancelledError, GenerationCancelled):
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a client-safe error
            raise _map_stage_error(stage, exc, self.settings.retry_after_s) from exc

    async def _choose_denoiser(self) -> str:
        if self.router is None or self.denoisers.get("standby") is None:
            return "primary"
        try:
            return await self.router.choose.remote()
        except Exception as exc:  # the router is advisory: never fail a request over it
            logger.warning("failover router unavailable (%r); using the primary denoiser", exc)
            return "primary"

    async def _report(self, target: str, seconds: float, plan: GenerationPlan, ok: bool) -> None:
        if self.router is None:
            return
        try:
            await self.router.record.remote(target, seconds, plan.work_units, ok)
        except Exception as exc:
            logger.warning("could not report to the failover router: %r", exc)

    async def _denoise(self, plan: GenerationPlan, embeddings: Any, carrier: dict,
                       on_progress: Callable[[dict], None] | None) -> tuple[Any, dict[str, float], str]:
        """Denoise on the router's choice; if that target fails, once more on the other one.

        A failed call is reported to the router first (errors count as breaches), so a
        broken primary is still failed over; meanwhile no accepted request is lost to it.
        """
        target = await self._choose_denoiser()
        try:
            return await self._denoise_on(target, plan, embeddings, carrier, on_progress)
        except VidgenError as exc:
            other = "standby" if target == "primary" else "primary"
            if exc.status_code < 500 or self.denoisers.get(other) is None:
                raise
            logger.warning("denoise on the %s failed (%s); retrying on the %s", target, exc.message, other)
            return await self._denoise_on(other, plan, embeddings, carrier, on_progress)

    async def _denoise_on(self, target: str, plan: GenerationPlan, embeddings: Any, carrier: dict,
                          on_progress: Callable[[dict], None] | None) -> tuple[Any, dict[str, float], str]:
        handle = self.denoisers[target]
        gen = handle.options(stream=True).denoise.remote(plan, embeddings, carrier)
        t0 = time.perf_counter()
        latents, timings, outcome = None, {}, "error"
        try:
            async for item in gen:
                if "progress" in item:
                    if on_progress is not None:
                        on_progress(item["progress"])
                else:
                    latents, timings = item["latents"], item["timings"]
            outcome = "ok" if latents is not None else "error"
        except (asyncio.CancelledError, GenerationCancelled):
            outcome = "cancelled"  # not the denoiser's fault: not reported to the router
            raise
        except Exception as exc:  # noqa: BLE001
            raise _map_stage_error("denoise", exc, self.settings.retry_after_s) from exc
        finally:
            if outcome != "ok":
                gen.cancel()  # stops the replica's loop at its next step boundary
            if outcome != "cancelled":
                await self._report(target, time.perf_counter() - t0, plan, outcome == "ok")
        if latents is None:
            raise VidgenError(500, "the denoise stage returned no latents", code="stage_error")
        return latents, timings, target

    async def _generate(self, plan: GenerationPlan, on_stage: Callable[[str], None] | None = None,
                        on_progress: Callable[[dict], None] | None = None) -> tuple[bytes, dict, dict]:
        """Run text encoder -> denoiser -> decoder. Returns (mp4, timings, info)."""
        t0 = time.perf_counter()
        with tracer().start_as_current_span("generate", attributes=plan.summary() | {"windows": len(plan.windows)}):
            carrier = carrier_for_current_span()
            if on_stage:
                on_stage("text_encode")
            embeddings, timings = await self._call("text_encode", self.text_encoder.encode.remote(plan, carrier))
            if on_stage:
                on_stage("denoise")
            latents, denoise_timings, target = await self._denoise(plan, embeddings, carrier, on_progress)
            timings.update(denoise_timings)
            if on_stage:
                on_stage("decode")
            mp4, decode_timings = await self._decode(plan, latents, carrier, on_progress)
            timings.update(decode_timings)
        timings["total"] = time.perf_counter() - t0
        self._stage_shares.observe(timings)
        info = {"denoiser": target, "text_cache": "hit" if embeddings.cache_misses == 0 else "miss"}
        return mp4, timings, info

    async def _decode(self, plan: GenerationPlan, latents: Any, carrier: dict,
                      on_progress: Callable[[dict], None] | None) -> tuple[bytes, dict[str, float]]:
        """Decode on the Decoder deployment, passing its phase progress on."""
        gen = self.decoder.options(stream=True).decode.remote(plan, latents, carrier)
        mp4, timings = None, {}
        try:
            async for item in gen:
                if "progress" in item:
                    if on_progress is not None:
                        on_progress(item["progress"])
                else:
                    mp4, timings = item["mp4"], item["timings"]
        except (asyncio.CancelledError, GenerationCancelled):
            raise
        except Exception as exc:  # noqa: BLE001
            raise _map_stage_error("decode", exc, self.settings.retry_after_s) from exc
        finally:
            if mp4 is None:
                gen.cancel()  # stops ffmpeg instead of finishing a video nobody will receive
        if mp4 is None:
            raise VidgenError(500, "the decode stage returned no video", code="stage_error")
        return mp4, timings

    # ---- sync generation ----------------------------------------------------------------

    @app.post("/v1/video/generate", openapi_extra=VIDEO_REQUEST_DOC, response_class=Response,
              responses={200: {"content": {"video/mp4": {}}, "description": "The MP4 file."}})
    async def generate(self, request: Request) -> Response:
        """Generate a video and return it as the response body (video/mp4)."""
        self._ensure_worker()
        key = self._auth(request)
        # Capacity first, before anything that awaits: a request over capacity is refused
        # at once, not after its body has been read (a round trip to the HTTP proxy, which
        # is busy relaying the accepted requests) and planned. The slot is taken in the same
        # step, so concurrent requests cannot all pass the check before any of them counts.
        if self._inflight_sync >= self.settings.max_inflight_sync:
            raise self._overloaded("concurrent generations")
        self._inflight_sync += 1
        status = "error"
        try:
            video_request, plan = self._plan(await self._json_body(request))
            deadline_s = self._deadline(request)
            with tracer().start_as_current_span("POST /v1/video/generate") as span:
                span.set_attribute("request_id", _request_id(request))
                span.set_attribute("key_id", key)
                try:
                    mp4, timings, info = await asyncio.wait_for(self._generate(plan), timeout=deadline_s)
                except asyncio.TimeoutError:
                    raise VidgenError(504, f"generation exceeded the {deadline_s:g}s deadline and was cancelled",
                                      code="deadline_exceeded") from None
            status = "ok"
        except VidgenError as exc:
            status = str(exc.status_code)
            raise
        finally:
            self._inflight_sync -= 1
            self._metrics.requests.inc(tags={"endpoint": "generate", "status": status})
        headers = {
            "Server-Timing": server_timing(timings, {"text_cache": info["text_cache"]}),
            "X-Vidgen-Denoiser": info["denoiser"],
            "X-Vidgen-Seed": str(plan.seed),
            "Content-Disposition": 'inline; filename="video.mp4"',
            **_warnings_header(not_yet_applied(video_request)),
        }
        return Response(mp4, media_type="video/mp4", headers=headers)

    # ---- async jobs ---------------------------------------------------------------------

    async def check_health(self) -> None:
        """Serve's periodic health check; also (re)starts the job worker, so a restarted
        replica resumes recovered jobs even before its first request."""
        self._ensure_worker()

    def _ensure_worker(self) -> None:
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._job_worker())

    async def _job_worker(self) -> None:
        """Claim queued jobs (this replica's and recovered ones), heartbeat running ones."""
        last_recovery = 0.0
        while True:
            try:
                now = time.monotonic()
                self.store.heartbeat(self.owner)
                if now - last_recovery >= self.settings.job_heartbeat_s:
                    last_recovery = now
                    self.store.recover_stale(self.settings.job_stale_after_s, self.settings.max_job_attempts)
                    counts = self.store.counts()
                    self._metrics.queue_depth.set(counts.get(QUEUED, 0))
                free = self.settings.max_running_jobs - len(self._job_tasks)
                if free > 0:
                    for job in self.store.queued()[:free]:
                        if self.store.claim(job.id, self.owner):
                            task = asyncio.get_running_loop().create_task(self._run_job(job.id))
                            self._job_tasks[job.id] = task
                            task.add_done_callback(lambda _t, jid=job.id: self._job_tasks.pop(jid, None))
            except Exception:  # keep the worker alive; the next tick retries
                logger.exception("job worker tick failed")
            await asyncio.sleep(0.2)

    async def _run_job(self, job_id: str) -> None:
        job = self.store.get(job_id)
        plan = GenerationPlan.model_validate(job.plan)
        progress = GenerationProgress(self._stage_shares.shares)
        stage_now = ["text_encode"]

        def on_stage(stage: str) -> None:
            stage_now[0] = stage
            self.store.update(job_id, stage=stage, progress=progress.update(stage))

        def on_progress(event: dict) -> None:
            current = self.store.get(job_id)
            if current is not None and current.cancel_requested:
                where = (f"step {event['step']}/{event['steps']}" if "step" in event
                         else f"the {event.get('phase', 'decode')} phase")
                raise GenerationCancelled(f"cancelled at {where}")
            self.store.update(job_id, progress=progress.update(stage_now[0], event))

        try:
            mp4, timings, info = await asyncio.wait_for(
                self._generate(plan, on_stage=on_stage, on_progress=on_progress),
                timeout=self.settings.request_timeout_s,
            )
            self.artifacts.put(job_id, mp4)
            self.store.update(job_id, state=SUCCEEDED, stage=None, timings=timings, error=None,
                              progress=progress.finished())
            self._metrics.requests.inc(tags={"endpoint": "jobs", "status": "ok"})
        except (asyncio.CancelledError, GenerationCancelled):
            current = self.store.get(job_id)
            if current is not None and current.cancel_requested:
                self.store.update(job_id, state=CANCELLED, stage=None, error="cancelled by the client")
                self._metrics.requests.inc(tags={"endpoint": "jobs", "status": "cancelled"})
            else:  # the replica is shutting down: leave it running; another replica resumes it
                raise
        except asyncio.TimeoutError:
            self.store.update(job_id, state=FAILED, stage=None,
                              error=f"exceeded the {self.settings.request_timeout_s:g}s deadline")
            self._metrics.requests.inc(tags={"endpoint": "jobs", "status": "504"})
        except VidgenError as exc:
            self.store.update(job_id, state=FAILED, stage=None, error=exc.message)
            self._metrics.requests.inc(tags={"endpoint": "jobs", "status": str(exc.status_code)})
        except Exception:
            logger.exception("job %s failed", job_id)
            self.store.update(job_id, state=FAILED, stage=None, error="internal error")
            self._metrics.requests.inc(tags={"endpoint": "jobs", "status": "500"})

    def _submit(self, request: VideoRequest, plan: GenerationPlan, key: str) -> dict[str, Any]:
        job = self.store.create(request.model_dump(mode="json"), plan.model_dump(mode="json"), key,
                                warnings=not_yet_applied(request))
        return job.public()

    def _queued_room(self, wanted: int) -> None:
        if self.store.counts().get(QUEUED, 0) + wanted > self.settings.max_queued_jobs:
            raise self._overloaded("queued jobs")

    @app.post("/v1/video/jobs", status_code=202, openapi_extra=VIDEO_REQUEST_DOC)
    async def submit_job(self, request: Request) -> JSONResponse:
        """Queue a generation; poll `GET /v1/video/jobs/{job_id}`."""
        self._ensure_worker()
        key = self._auth(request)
        video_request, plan = self._plan(await self._json_body(request))
        self._queued_room(1)
        job = self._submit(video_request, plan, key)
        return JSONResponse(job, status_code=202, headers={"Location": f"/v1/video/jobs/{job['job_id']}",
                                                           **_warnings_header(job["warnings"])})

    @app.post("/v1/video/batch", status_code=202, openapi_extra=BATCH_DOC)
    async def submit_batch(self, request: Request) -> JSONResponse:
        """Queue many generations at once: all are validated first, then all are queued."""
        self._ensure_worker()
        key = self._auth(request)
        body = await self._json_body(request)
        if not isinstance(body, dict) or set(body) != {"requests"} or not isinstance(body["requests"], list):
            raise InvalidRequest([field_error("requests", None, "body must be {\"requests\": [VideoRequest, ...]}")])
        items = body["requests"]
        if not 1 <= len(items) <= self.settings.max_batch_size:
            raise InvalidRequest([field_error("requests", len(items), "wrong number of requests",
                                              f"1..{self.settings.max_batch_size}")])
        planned, errors = [], []
        for i, item in enumerate(items):
            try:
                planned.append(self._plan(item))
            except InvalidRequest as exc:
                errors += [{**d, "field": f"requests.{i}.{d['field']}"} for d in exc.details]
        if errors:
            raise InvalidRequest(errors)
        self._queued_room(len(planned))
        jobs = [self._submit(r, p, key) for r, p in planned]
        warned = [f"requests.{i}.{w}" for i, job in enumerate(jobs) for w in job["warnings"]]
        return JSONResponse({"jobs": jobs}, status_code=202, headers=_warnings_header(warned))

    def _own_job(self, request: Request, job_id: str):
        key = self._auth(request)
        job = self.store.get(job_id) if JOB_ID_RE.match(job_id) else None
        if job is None or job.key_id != key:  # another key's job is as good as absent
            raise VidgenError(404, f"no job {job_id!r}", code="not_found")
        return job

    @app.get("/v1/video/jobs/{job_id}")
    async def get_job(self, request: Request, job_id: str) -> dict[str, Any]:
        """State, current stage, progress (step i/n of window w/W), timings, error."""
        return self._own_job(request, job_id).public()

    @app.get("/v1/video/jobs/{job_id}/content", response_class=FileResponse,
             responses={200: {"content": {"video/mp4": {}}}, 206: {"description": "Partial content (Range)."}})
    async def job_content(self, request: Request, job_id: str) -> FileResponse:
        """The finished MP4 (404 until the job has succeeded, 410 if it never will). Supports HTTP Range."""
        job = self._own_job(request, job_id)
        if job.state in (CANCELLED, FAILED):
            why = "was cancelled" if job.state == CANCELLED else f"failed ({job.error})"
            raise VidgenError(410, f"job {job_id} {why}: it has no content and never will; submit it again",
                              code=f"job_{job.state}")
        if job.state != SUCCEEDED or not self.artifacts.exists(job.id):
            raise VidgenError(404, f"job {job_id} has no content yet (state: {job.state})", code="not_ready")
        return FileResponse(self.artifacts.path(job.id), media_type="video/mp4", filename=f"{job.id}.mp4",
                            content_disposition_type="inline")

    @app.delete("/v1/video/jobs/{job_id}", status_code=202)
    async def cancel_job(self, request: Request, job_id: str) -> JSONResponse:
        """Cancel a job; a running one stops at the next denoising step boundary."""
        job = self._own_job(request, job_id)
        if job.state in FINAL_STATES:
            raise VidgenError(409, f"job {job_id} already {job.state}", code="already_final")
        self.store.update(job.id, cancel_requested=1)
        if job.state == QUEUED and self.store.get(job.id).state == QUEUED:
            self.store.update(job.id, state=CANCELLED, stage=None, error="cancelled by the client")
        task = self._job_tasks.get(job.id)
        if task is not None:
            task.cancel()
        return JSONResponse(self.store.get(job.id).public(), status_code=202)

    # ---- prompt analysis, schema, health --------------------------------------------------

    @app.post("/v1/prompt/analyze", openapi_extra=ANALYZE_DOC)
    async def analyze(self, request: Request) -> dict[str, Any]:
        """How the prompt will be encoded: styled text, token counts vs the encoder's limit."""
        self._auth(request)
        body = await self._json_body(request)
        if not isinstance(body, dict):
            raise InvalidRequest([field_error("body", None, "must be a JSON object")])
        unknown = set(body) - {"prompt", "negative_prompt", "style"}
        if unknown:
            raise InvalidRequest([field_error(k, body[k], "unknown field", ["prompt", "negative_prompt", "style"])
                                  for k in sorted(unknown)])
        _, plan = self._plan({k: v for k, v in body.items()})
        texts = [plan.prompts[0], plan.negative_prompt]
        counts = await self._call("text_encode", self.text_encoder.count_tokens.remote(texts))
        limit = counts["limit"]
        warnings = []
        for name, n in zip(("prompt", "negative_prompt"), counts["tokens"]):
            if n > limit:
                warnings.append(f"{name} is {n} tokens; the encoder keeps the first {limit}, the rest is ignored")
        return {
            "prompt": plan.prompts[0],
            "negative_prompt": plan.negative_prompt,
            "style": plan.style,
            "tokens": {"prompt": counts["tokens"][0], "negative_prompt": counts["tokens"][1], "limit": limit},
            "truncated": bool(warnings),
            "warnings": warnings,
        }

    @app.get("/v1/schema")
    async def schema(self) -> dict[str, Any]:
        """The request JSON Schema, plus what this deployment's profile allows."""
        profile = self.config.model_profile
        return {
            "request": request_schema(profile),
            "styles": sorted(self.config.styles),
            "profile": {
                "name": profile.name,
                "resolutions": profile.resolutions,
                "max_duration_s": profile.max_duration_s,
                "max_steps": profile.max_steps,
                "max_guidance_scale": profile.max_guidance_scale,
                "native_fps": profile.native_fps,
                "max_sequence_length": profile.max_sequence_length,
            },
        }

    @app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        """Liveness: this ingress replica answers."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(self) -> JSONResponse:
        """Readiness: every deployment of this application has a running replica (see `serving.readiness`)."""
        if self._readiness is None:
            app_name = serve.get_replica_context().app_name
            self._readiness = ReadinessCheck(lambda: serve_deployments(app_name))
        try:
            ready, deployments = await self._readiness.check()
        except Exception as exc:  # noqa: BLE001 - report, don't raise
            return JSONResponse({"status": "unknown", "error": repr(exc)}, status_code=503)
        return JSONResponse({"status": "ready" if ready else "not_ready", "deployments": deployments},
                            status_code=200 if ready else 503)

    @app.get("/v1/admin/router")
    async def router_state(self, request: Request) -> dict[str, Any]:
        """Failover router state, baseline, recent normalised latencies, switch history (admin keys only)."""
        self._admin(request)
        if self.router is None:
            return {"enabled": False, "active": "primary"}
        return {"enabled": True, **(await self.router.snapshot.remote())}


def _warnings_header(warnings: list[str]) -> dict[str, str]:
    """``{X-Vidgen-Warnings: "..."}`` when there are warnings (HTTP headers are one line of latin-1)."""
    if not warnings:
        return {}
    text = "; ".join(w.replace("\n", " ") for w in warnings)
    return {WARNINGS_HEADER: text.encode("latin-1", "replace").decode("latin-1")}


class _IngressMetrics:
    def __init__(self) -> None:
        from ray.serve import metrics

        self.requests = metrics.Counter("vidgen_requests", description="Generation requests by endpoint and status.",
                                        tag_keys=("endpoint", "status"))
        self.rejected = metrics.Counter("vidgen_rejected", description="Requests refused for capacity.",
                                        tag_keys=("reason",))
        self.queue_depth = metrics.Gauge("vidgen_jobs_queued", description="Async jobs waiting to run.")


# Applied at import time on purpose: replicas import this module and must see the same
# class-based routes (a wrapper built later in the driver would not travel by reference).
IngressApp = serve.ingress(app)(Ingress)
