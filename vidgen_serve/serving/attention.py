"""`POST /v1/prompt/attention` through the stage deployments: tokens and embeddings from the
TextEncoder, the capture and the PNG in a (primary) Denoiser replica.

See `vidgen_serve.attention` (request, plan, fields) and `vidgen_serve.pipeline.attention_maps`
(capture, grid).
"""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

from fastapi.responses import JSONResponse, Response

from ..attention import AttentionRequest, attention_plan, check_attention_supported
from ..config import AppConfig
from ..errors import GenerationCancelled
from .orchestrator import GenerationOrchestrator, map_stage_error
from .telemetry import carrier_for_current_span, tracer

PNG = "image/png"


async def _stage(stage: str, awaitable: Any, retry_after_s: int) -> Any:
    try:
        return await awaitable
    except (asyncio.CancelledError, GenerationCancelled):
        raise
    except Exception as exc:  # noqa: BLE001 - mapped to a client-safe error
        raise map_stage_error(stage, exc, retry_after_s) from exc


async def run_attention(orchestrator: GenerationOrchestrator, config: AppConfig, body: AttentionRequest) -> dict:
    """The attention-map document of `body` (`AttentionMaps.document()` plus "png" bytes).

    Raises:
        VidgenError: 501 on a parallel denoiser profile; 422 naming a field past the profile's bounds.
    """
    check_attention_supported(config)
    plan = attention_plan(body, config)
    retry = orchestrator.retry_after_s
    with tracer().start_as_current_span("attention", attributes=plan.summary()):
        carrier = carrier_for_current_span()
        text = orchestrator.text_encoder
        tokens = await _stage("text_encode", text.tokens.remote(plan.prompts[0]), retry)
        embeddings, _ = await _stage("text_encode", text.encode.remote(plan, carrier), retry)
        return await _stage("denoise", orchestrator.denoisers["primary"].attention.remote(
            plan, embeddings, tokens, body.prompt, carrier), retry)


def wants_png(accept: str | None) -> bool:
    """True when the client's Accept names image/png before (or without) application/json."""
    for part in (accept or "").split(","):
        media = part.split(";")[0].strip().lower()
        if media == PNG:
            return True
        if media == "application/json":
            return False
    return False


def attention_response(result: dict, accept: str | None) -> Response:
    """JSON with the PNG in `png_base64`, or (Accept: image/png) the PNG itself with the column
    labels in `X-Vidgen-Columns` (a JSON list, non-ASCII escaped) and the grid in `X-Vidgen-Grid`."""
    png = result.pop("png")
    grid = result["grid"]
    if wants_png(accept):
        columns = result["tokens"] + [f["name"] for f in result["fields"]]
        return Response(png, media_type=PNG, headers={
            "X-Vidgen-Columns": json.dumps(columns, ensure_ascii=True),
            "X-Vidgen-Grid": f"rows={grid['rows']}; cols={grid['cols']}; width={grid['width']}; "
                             f"height={grid['height']}",
            "X-Vidgen-Seed": str(result["seed"]),
        })
    return JSONResponse({**result, "png_base64": base64.b64encode(png).decode("ascii")})
