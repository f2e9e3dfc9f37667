"""This product's HTTP API: sync generation, async jobs, prompt analysis, schema, health, admin.

Route functions are thin: typed bodies (the OpenAPI document is generated from the
pydantic models), auth as a dependency, and the work done by the `Ingress` services.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Awaitable, Callable, Iterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from ..attention import AttentionRequest
from ..errors import InvalidRequest, VidgenError, field_error
from ..media.quality import quality_header
from ..prompting.analysis import analysis_document, analyze as analyze_prompt
from ..request import MAX_PROMPT_CHARS, Keyframe, VideoRequest, not_yet_applied, parse_request, request_schema
from .http import admin_key, api_key, ingress_of, request_id, server_timing, warnings_header
from .telemetry import tracer

router = APIRouter()

MAX_BATCH = 256  # the schema's bound; `max_batch_size` (<= 256) is the deployment's


class BatchRequest(BaseModel):
    """Many generations queued at once (all validated first, then all queued)."""

    model_config = ConfigDict(extra="forbid")

    requests: list[VideoRequest] = Field(min_length=1, max_length=MAX_BATCH,
                                         description="The requests (at most the deployment's max_batch_size).")


class AnalyzeRequest(BaseModel):
    """What `/v1/prompt/analyze` reads: the text side of a `VideoRequest` (same fields, same bounds)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="The prompt to analyse.")
    negative_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS, description="A negative prompt.")
    style: str | None = Field(None, min_length=1, max_length=64, description="A style preset name.")
    duration: float | None = Field(None, description="Seconds (as in a video request; default 5).")
    keyframes: list[Keyframe] | None = Field(None, description="The request's prompt schedule.")
    motion_intensity: float | None = Field(None, description="As in a video request (prompt descriptor).")
    color_palette: str | None = Field(None, description="As in a video request (prompt descriptor).")
    camera_motion: str | None = Field(None, description="As in a video request (prompt descriptor).")
    temporal_consistency: float | None = Field(None, description="As in a video request (window overlap).")


MP4_RESPONSE = {200: {"content": {"video/mp4": {}}, "description": "The MP4 file."}}


@contextlib.contextmanager
def counted(ingress: Any, endpoint: str) -> Iterator[None]:
    """Count the request in the `requests` metric by its outcome: ok, the error's status, or error."""
    status = "error"
    try:
        yield
        status = "ok"
    except VidgenError as exc:
        status = str(exc.status_code)
        raise
    finally:
        ingress.metrics.requests.inc(tags={"endpoint": endpoint, "status": status})


async def within_deadline(ingress: Any, request: Request, what: str, work: Callable[[], Awaitable[Any]]) -> Any:
    """`work()` under the request's deadline (`X-Vidgen-Timeout` or the default): past it, cancelled and 504."""
    deadline_s = ingress.deadline(request)
    try:
        return await asyncio.wait_for(work(), timeout=deadline_s)
    except asyncio.TimeoutError:
        raise VidgenError(504, f"{what} exceeded the {deadline_s:g}s deadline and was cancelled",
                          code="deadline_exceeded") from None


# ---- sync generation --------------------------------------------------------------------


@router.post("/v1/video/generate", response_class=Response, responses=MP4_RESPONSE)
async def generate(request: Request, body: VideoRequest, key: str = Depends(api_key)) -> Response:
    """Generate a video and return it as the response body (video/mp4).

    Its capacity slot (`max_inflight_sync`) was taken before the body was read (`http.SyncSlots`).
    """
    ingress = ingress_of(request)
    with counted(ingress, "generate"):
        plan = ingress.plan(body)
        with tracer().start_as_current_span("POST /v1/video/generate") as span:
            span.set_attribute("request_id", request_id(request))
            span.set_attribute("key_id", key)
            result = await within_deadline(ingress, request, "generation", lambda: ingress.orchestrator.generate(plan))
    headers = {
        "Server-Timing": server_timing(result.timings, {"text_cache": result.text_cache}),
        "X-Vidgen-Denoiser": result.denoiser,
        "X-Vidgen-Seed": str(plan.seed),
        "Content-Disposition": 'inline; filename="video.mp4"',
        **warnings_header(not_yet_applied(body) + [f"prompt: {w}" for w in plan.prompt_warnings]),
        **quality_header(result.quality),
    }
    return Response(result.mp4, media_type="video/mp4", headers=headers)


# ---- async jobs ---------------------------------------------------------------------------


@router.post("/v1/video/jobs", status_code=202)
async def submit_job(request: Request, body: VideoRequest, key: str = Depends(api_key)) -> JSONResponse:
    """Queue a generation; poll `GET /v1/video/jobs/{job_id}`."""
    ingress = ingress_of(request)
    (job,) = await ingress.submit([(body, ingress.plan(body))], key)
    return JSONResponse(job.public(), status_code=202, headers={"Location": f"/v1/video/jobs/{job.id}",
                                                                **warnings_header(job.warnings)})


@router.post("/v1/video/batch", status_code=202)
async def submit_batch(request: Request, body: BatchRequest, key: str = Depends(api_key)) -> JSONResponse:
    """Queue many generations at once: all are validated first, then all are queued."""
    ingress = ingress_of(request)
    limit = ingress.settings.max_batch_size
    if len(body.requests) > limit:
        raise InvalidRequest([field_error("requests", len(body.requests), "wrong number of requests", f"1..{limit}")])
    planned, errors = [], []
    for i, item in enumerate(body.requests):
        try:
            planned.append((item, ingress.plan(item)))
        except InvalidRequest as exc:
            errors += [{**d, "field": f"requests.{i}.{d['field']}"} for d in exc.details]
    if errors:
        raise InvalidRequest(errors)
    jobs = await ingress.submit(planned, key)
    warned = [f"requests.{i}.{w}" for i, job in enumerate(jobs) for w in job.warnings]
    return JSONResponse({"jobs": [j.public() for j in jobs]}, status_code=202, headers=warnings_header(warned))


@router.get("/v1/video/jobs/{job_id}")
async def get_job(request: Request, job_id: str, key: str = Depends(api_key)) -> dict[str, Any]:
    """State, current stage, progress (step i/n of window w/W), timings, error."""
    return (await ingress_of(request).own_job(job_id, key)).public()


@router.get("/v1/video/jobs/{job_id}/content", response_class=Response,
            responses={**MP4_RESPONSE, 206: {"description": "Partial content (Range)."},
                       307: {"description": "Redirect to a presigned URL (artifact_redirect)."}})
async def job_content(request: Request, job_id: str, key: str = Depends(api_key)) -> Response:
    """The finished MP4 (404 until the job has succeeded, 410 if it never will). Supports HTTP Range."""
    ingress = ingress_of(request)
    return await ingress.content(await ingress.own_job(job_id, key), request)


@router.delete("/v1/video/jobs/{job_id}", status_code=202)
async def cancel_job(request: Request, job_id: str, key: str = Depends(api_key)) -> JSONResponse:
    """Cancel a job; a running one stops at the next denoising step boundary."""
    ingress = ingress_of(request)
    job = await ingress.cancel(await ingress.own_job(job_id, key))
    return JSONResponse(job.public(), status_code=202)


# ---- prompt analysis, schema, health -----------------------------------------------------


@router.post("/v1/prompt/analyze")
async def analyze(request: Request, body: AnalyzeRequest, key: str = Depends(api_key)) -> dict[str, Any]:
    """How the prompt is read and encoded: fields, final prompts, negative prompt, keyframe schedule per
    sliding window, token counts vs the encoder's limit, warnings (`vidgen-serve analyze` prints the same)."""
    ingress = ingress_of(request)
    config = ingress.config
    analysis = analyze_prompt(parse_request(body.model_dump(exclude_none=True), config.model_profile), config)
    counts = await ingress.orchestrator.count_tokens(analysis.texts)
    return analysis_document(analysis, counts["tokens"], counts["limit"])


@router.post("/v1/prompt/attention", response_class=Response,
             responses={200: {"content": {"application/json": {}, "image/png": {}},
                              "description": "Maps as JSON (PNG in png_base64), or the PNG with Accept: image/png."},
                        501: {"description": "Not available on a parallel (multi-process) denoiser profile."}})
async def prompt_attention(request: Request, body: AttentionRequest, key: str = Depends(api_key)) -> Response:
    """Cross-attention maps of a short low-resolution generation: per latent frame, per prompt token
    (and structured field), where the transformer looked (see `serving.attention`)."""
    from .attention import attention_response, run_attention

    ingress = ingress_of(request)
    with counted(ingress, "attention"):
        result = await within_deadline(ingress, request, "attention maps",
                                       lambda: run_attention(ingress.orchestrator, ingress.config, body))
    return attention_response(result, request.headers.get("accept"))


@router.get("/v1/schema")
async def schema(request: Request) -> dict[str, Any]:
    """The request JSON Schema, plus what this deployment's profile allows."""
    config = ingress_of(request).config
    profile = config.model_profile
    return {
        "request": request_schema(profile),
        "styles": sorted(config.styles),
        "style_adapters": sorted(config.style_adapters),  # styles that load a LoRA adapter into the denoiser
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


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness: this ingress replica answers."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """Readiness: every deployment of this application has a running replica (see `serving.readiness`)
    and the job store answers."""
    ready, info = await ingress_of(request).readiness()
    return JSONResponse(info, status_code=200 if ready else 503)


@router.get("/v1/admin/router", dependencies=[Depends(admin_key)])
async def router_state(request: Request) -> dict[str, Any]:
    """Failover router state, baseline, recent normalised latencies, switch history (admin keys only)."""
    ingress = ingress_of(request)
    if ingress.router is None:
        return {"enabled": False, "active": "primary"}
    return {"enabled": True, **(await ingress.router.snapshot.remote())}


@router.get("/v1/admin/event-loop", dependencies=[Depends(admin_key)])
async def event_loop(request: Request) -> dict[str, Any]:
    """The longest event-loop stall of this replica since the last call, with where the loop was during
    the worst stall its watchdog caught (admin keys only)."""
    return ingress_of(request).loop_lag.take()
