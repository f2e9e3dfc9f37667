"""OpenAI-style video routes (`/v1/videos`), mapped onto the same jobs as `/v1/video/jobs`.

The shape follows OpenAI's Videos API as SGLang and vLLM-Omni serve it: `POST /v1/videos`
queues a job and returns a video object (`id`, `object: "video"`, `status` queued /
in_progress / completed / failed, `progress` 0..100, `size`, `seconds`, ...); `GET
/v1/videos/{id}`, `GET /v1/videos/{id}/content`, `GET /v1/videos` (list) and `DELETE
/v1/videos/{id}`. Existing OpenAI clients work unchanged (`client.videos.create(...)`).

Mapping: `seconds` -> `duration`; `size` ("WxH", one of this profile's output sizes) ->
`resolution` + `aspect`; every field of our request model (style, seed, fps,
negative_prompt, ...) is accepted as an extension. Video ids are `video_<job id>`.
A cancelled job shows as `failed` with error code `cancelled`. DELETE of a queued or
running video cancels it; DELETE of an ended one removes it and its MP4.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..config import output_size
from ..errors import InvalidRequest, VidgenError
from ..plan import GenerationPlan
from ..request import HARD_MAX_DURATION_S, VideoRequest, parse_request
from ..state.jobs import CANCELLED, FAILED, FINAL_STATES, QUEUED, RUNNING, SUCCEEDED, Job
from .http import api_key, ingress_of

router = APIRouter(prefix="/v1/videos", tags=["OpenAI-compatible videos"])

ID_PREFIX = "video_"
_STATUS = {QUEUED: "queued", RUNNING: "in_progress", SUCCEEDED: "completed", FAILED: "failed", CANCELLED: "failed"}
_RESOLUTIONS = ("480p", "720p", "1080p", "4k")
_ASPECTS = ("16:9", "9:16", "1:1")
# "1280x720" -> ("720p", "16:9"), for every output size a request can name.
SIZES = {f"{w}x{h}": (res, aspect) for res in _RESOLUTIONS for aspect in _ASPECTS
         for w, h in [output_size(res, aspect)]}


class VideoCreate(VideoRequest):
    """`POST /v1/videos`: OpenAI's fields plus every field of `VideoRequest` as an extension."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"title": "VideoCreate"})

    model: str | None = Field(None, max_length=128, description="Accepted for compatibility; this deployment "
                              "serves its configured profile (echoed back as the video's model).")
    seconds: int | None = Field(None, ge=1, le=int(HARD_MAX_DURATION_S),
                                description="Length in seconds (OpenAI sends a string such as \"8\"); sets duration.")
    size: str | None = Field(None, max_length=16, description="Output size 'WIDTHxHEIGHT', e.g. '1280x720'; sets "
                             "resolution and aspect.")

    @field_validator("seconds", mode="before")
    @classmethod
    def _seconds_from_string(cls, value: Any) -> Any:
        return int(value) if isinstance(value, str) and value.strip().isdigit() else value

    @field_validator("size")
    @classmethod
    def _known_size(cls, value: str | None) -> str | None:
        if value is not None and value not in SIZES:
            raise ValueError(f"size must be one of {sorted(SIZES)}")
        return value

    def to_video_request(self) -> VideoRequest:
        """The same request in this product's terms (duration, resolution, aspect)."""
        data = self.model_dump(exclude_unset=True, exclude={"model", "seconds", "size"})
        if self.seconds is not None:
            data["duration"] = self.seconds
        if self.size is not None:
            data["resolution"], data["aspect"] = SIZES[self.size]
        return parse_request(data)


class VideoError(BaseModel):
    code: str
    message: str


class Video(BaseModel):
    """OpenAI's video object."""

    id: str
    object: Literal["video"] = "video"
    model: str
    status: Literal["queued", "in_progress", "completed", "failed"]
    progress: int = Field(ge=0, le=100)
    created_at: int
    completed_at: int | None = None
    expires_at: int | None = None
    size: str
    seconds: str
    quality: str = "standard"
    remixed_from_video_id: str | None = None
    error: VideoError | None = None
    # This product's addition: the finished video's quality metrics (`quality` is OpenAI's tier).
    quality_metrics: dict[str, float] | None = Field(
        None, description="Temporal SSIM, temporal PSNR (dB) and flicker score of the finished video.")


class VideoList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Video]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class VideoDeleted(BaseModel):
    id: str
    object: Literal["video.deleted"] = "video.deleted"
    deleted: bool


def video_id(job_id: str) -> str:
    return ID_PREFIX + job_id


def job_id_of(vid: str) -> str:
    """The job id behind a video id (`video_<hex>`; a bare job id is accepted too)."""
    return vid[len(ID_PREFIX):] if vid.startswith(ID_PREFIX) else vid


def progress_percent(job: Job) -> int:
    """0..100: denoising steps done over all windows (to 95), then decoding, then 100."""
    if job.state == SUCCEEDED:
        return 100
    if job.state == QUEUED:
        return 0
    p = job.progress or {}
    if "fraction" in p:  # an overall fraction, where the job reports one
        return min(99, int(100 * float(p["fraction"])))
    if job.stage == "decode":
        return 95
    steps, windows = p.get("steps") or 0, p.get("windows") or 0
    if not steps or not windows:
        return 0
    done = (p.get("window", 1) - 1) * steps + p.get("step", 0)
    return min(95, int(95 * done / (steps * windows)))


def to_video(job: Job, model: str) -> Video:
    plan = GenerationPlan.model_validate(job.plan)
    error = None
    if job.state == CANCELLED:
        error = VideoError(code="cancelled", message=job.error or "cancelled")
    elif job.state == FAILED:
        error = VideoError(code="generation_failed", message=job.error or "failed")
    return Video(
        id=video_id(job.id), model=model, status=_STATUS[job.state], progress=progress_percent(job),
        created_at=int(job.created_at), completed_at=int(job.updated_at) if job.state in FINAL_STATES else None,
        size=f"{plan.output_width}x{plan.output_height}", seconds=f"{plan.duration_s:g}", error=error,
        quality_metrics=job.quality or None,
    )


def _rename_fields(exc: InvalidRequest) -> InvalidRequest:
    # Profile checks name our fields; an OpenAI client sent seconds / size.
    names = {"duration": "seconds", "resolution": "size", "aspect": "size"}
    return InvalidRequest([{**d, "field": names.get(d["field"], d["field"])} for d in exc.details])


@router.post("", response_model=Video)
async def create_video(request: Request, body: VideoCreate, key: str = Depends(api_key)) -> Video:
    """Queue a video (OpenAI `videos.create`); poll `GET /v1/videos/{id}`."""
    ingress = ingress_of(request)
    video_request = body.to_video_request()
    try:
        plan = ingress.plan(video_request)
    except InvalidRequest as exc:
        raise _rename_fields(exc) from None
    (job,) = await ingress.submit([(video_request, plan)], key)
    return to_video(job, ingress.config.model_profile.name)


@router.get("", response_model=VideoList)
async def list_videos(request: Request, key: str = Depends(api_key),
                      limit: int = Query(20, ge=1, le=100, description="Page size."),
                      after: str | None = Query(None, max_length=64, description="Last id of the previous page."),
                      order: Literal["desc"] = Query("desc", description="Newest first.")) -> VideoList:
    """The caller's videos, newest first."""
    ingress = ingress_of(request)
    jobs = await ingress.store.list(key, limit + 1, job_id_of(after) if after else None)
    page = [to_video(j, ingress.config.model_profile.name) for j in jobs[:limit]]
    return VideoList(data=page, first_id=page[0].id if page else None, last_id=page[-1].id if page else None,
                     has_more=len(jobs) > limit)


@router.get("/{vid}", response_model=Video)
async def retrieve_video(request: Request, vid: str, key: str = Depends(api_key)) -> Video:
    """One video's status and progress."""
    ingress = ingress_of(request)
    return to_video(await ingress.own_job(job_id_of(vid), key), ingress.config.model_profile.name)


@router.get("/{vid}/content", response_class=Response,
            responses={200: {"content": {"video/mp4": {}}}, 206: {"description": "Partial content (Range)."}})
async def video_content(request: Request, vid: str, key: str = Depends(api_key),
                        variant: Literal["video"] = Query("video", description="Only 'video' is served.")) -> Response:
    """The MP4 (404 until completed); HTTP Range, or a redirect to a presigned URL when configured."""
    ingress = ingress_of(request)
    return await ingress.content(await ingress.own_job(job_id_of(vid), key), request)


@router.delete("/{vid}", response_model=VideoDeleted)
async def delete_video(request: Request, vid: str, key: str = Depends(api_key)) -> VideoDeleted:
    """Cancel a queued or running video; remove an ended one and its MP4."""
    ingress = ingress_of(request)
    job = await ingress.own_job(job_id_of(vid), key)
    if job.state not in FINAL_STATES:
        await ingress.cancel(job)
        return VideoDeleted(id=vid, deleted=True)
    if job.artifact:
        await ingress.artifacts.delete(job.artifact)
    if not await ingress.store.delete(job.id):
        raise VidgenError(404, f"no video {vid!r}", code="not_found")
    return VideoDeleted(id=vid, deleted=True)

