"""The HTTP application: one FastAPI app per ingress replica, its middleware and error boundary.

Routes live in `routes.py` (this product's API) and `openai_videos.py` (OpenAI-style
`/v1/videos`); both read typed pydantic bodies, so the OpenAPI document is generated from
the models. Every error leaves through one JSON shape (`errors.error_body`) with the
request id; bodies over `max_body_bytes` are refused with 413 while they are read; sync
generations over `max_inflight_sync` are refused with 429 before their body is read
(`SyncSlots`).
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import InvalidRequest, VidgenError, error_body, field_error, from_error_list
from ..request import duration_limit, request_schema

logger = logging.getLogger("vidgen_serve.http")

STAGE_ORDER = ("text_encode", "denoise", "vae_decode", "encode")
DEADLINE_HEADER = "X-Vidgen-Timeout"
WARNINGS_HEADER = "X-Vidgen-Warnings"
GENERATE_PATH = "/v1/video/generate"


def request_id(request: Request) -> str:
    """The request id Ray Serve's proxy put on the request (and echoes in X-Request-ID)."""
    rid = getattr(request.state, "request_id", None)
    if rid is None:
        rid = request.headers.get("x-request-id", "")[:64] or uuid.uuid4().hex
        request.state.request_id = rid
    return rid


def error_response(exc: VidgenError, request: Request) -> JSONResponse:
    headers = dict(exc.headers or {})
    ingress = getattr(request.app.state, "ingress", None) if "app" in request.scope else None
    if exc.status_code in (429, 503) and getattr(ingress, "settings", None) is not None:
        # One source for when to retry: the deployment's `retry_after_s` (stores, stages, shedding).
        headers["Retry-After"] = str(ingress.settings.retry_after_s)
    return JSONResponse(error_body(exc, request_id(request)), status_code=exc.status_code, headers=headers or None)


def warnings_header(warnings: list[str]) -> dict[str, str]:
    """``{X-Vidgen-Warnings: "..."}`` when there are warnings (HTTP headers are one line of latin-1)."""
    if not warnings:
        return {}
    text = "; ".join(w.replace("\n", " ") for w in warnings)
    return {WARNINGS_HEADER: text.encode("latin-1", "replace").decode("latin-1")}


def server_timing(timings: dict[str, float], extra: dict[str, str] | None = None) -> str:
    """`Server-Timing` header value: stage durations in milliseconds (+ descriptive entries)."""
    parts = [f"{name};dur={timings[name] * 1000:.1f}" for name in (*STAGE_ORDER, "total") if name in timings]
    parts += [f'{name};desc="{value}"' for name, value in (extra or {}).items()]
    return ", ".join(parts)


def ingress_of(request: Request) -> Any:
    """The `Ingress` replica object serving this app."""
    return request.app.state.ingress


# Shown in the OpenAPI document as the bearer scheme; checked by `api_key` (auto_error off:
# a missing key gets our 401 shape, not FastAPI's 403).
_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer <key>`.")


# The auth dependencies are `async def` on purpose: FastAPI runs a plain `def` dependency on its thread
# pool, and when no idle worker thread is left, starting one blocks the event loop until the new thread
# has run (anyio waits for it): that was the ingress's longest loop stall under polling load. The check
# itself is a hash and constant-time compares (microseconds): it belongs on the loop.


async def api_key(request: Request, _: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> str:
    """Dependency: the caller's key id (401 without a valid API key)."""
    return _api_key(request)


def _api_key(request: Request) -> str:
    key = ingress_of(request).keys.check(request.headers.get("authorization"))
    if key is None:
        raise VidgenError(401, "missing or invalid API key (use 'Authorization: Bearer <key>')",
                          code="unauthorized", headers={"WWW-Authenticate": "Bearer"})
    return key


async def admin_key(request: Request, _: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
    """Dependency: an admin key (401 without a valid key, 403 with a plain API key)."""
    ingress = ingress_of(request)
    # An admin key need not also be an API key (VIDGEN_ADMIN_KEYS is its own list).
    if ingress.admin_keys.check(request.headers.get("authorization")) is not None:
        return
    _api_key(request)
    raise VidgenError(403, "this endpoint needs an admin key (VIDGEN_ADMIN_KEYS)", code="forbidden")


class BodyLimit:
    """ASGI middleware: refuse request bodies over `max_bytes` (413) as they arrive.

    A declared Content-Length over the limit fails before anything is read; a streamed
    body fails at the chunk that crosses it. The error surfaces inside the route, where
    the error boundary answers it in the usual JSON shape (an `HTTPException`, because
    FastAPI turns any other error raised while it reads a body into a 400).
    """

    def __init__(self, app: Any, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        too_large = HTTPException(413, f"request body larger than {limit} bytes")
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        seen = 0

        async def limited_receive() -> dict:
            nonlocal seen
            if declared.isdigit() and int(declared) > limit:
                raise too_large
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise too_large
            return message

        await self.app(scope, limited_receive, send)


class SyncSlots:
    """ASGI middleware: the sync generation's capacity, decided before its body is read.

    A request over `max_inflight_sync` is refused (429) at once, not after its body has been
    read (a round trip to the HTTP proxy, which is busy relaying the accepted requests) and
    planned. The slot is taken in the same step as the check, so concurrent requests cannot
    all pass it before any of them counts; it is released when the response has been sent.
    Requests without a valid API key pass through untouched (the route answers 401).
    """

    def __init__(self, app: Any, ingress: Any):
        self.app = app
        self.ingress = ingress

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        path, root = scope.get("path", ""), scope.get("root_path", "")
        if root and path.startswith(root):  # mounted under a route prefix
            path = path[len(root):]
        if scope["type"] != "http" or scope.get("method") != "POST" or path != GENERATE_PATH:
            await self.app(scope, receive, send)
            return
        ingress = self.ingress
        auth = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        if ingress.keys.check(auth or None) is None:
            await self.app(scope, receive, send)
            return
        if ingress.inflight_sync >= ingress.settings.max_inflight_sync:
            request = Request(scope)
            await error_response(ingress.overloaded("concurrent generations"), request)(scope, receive, send)
            return
        ingress.inflight_sync += 1
        try:
            await self.app(scope, receive, send)
        finally:
            ingress.inflight_sync -= 1


def _body_schema(request: Request, model: Any) -> dict[str, Any] | None:
    # A VideoRequest (alone or in a batch) is bounded by the active profile.
    from ..request import VideoRequest

    profile = ingress_of(request).config.model_profile
    if model is VideoRequest:
        return request_schema(profile)
    return model.model_json_schema() if hasattr(model, "model_json_schema") else None


def _validation_details(request: Request, exc: RequestValidationError) -> InvalidRequest:
    """FastAPI's validation errors in our shape: field names without the `body.` prefix,
    allowed values from the body model's JSON Schema, invalid JSON and non-objects named."""
    route = request.scope.get("route")
    body_field = getattr(route, "body_field", None)
    model = getattr(getattr(body_field, "field_info", None), "annotation", None)
    schema = _body_schema(request, model)
    errors, special = [], []
    for err in exc.errors():
        loc = tuple(err.get("loc", ()))
        if err.get("type") == "json_invalid":
            reason = (err.get("ctx") or {}).get("error", "JSON decode error")
            special.append(field_error("body", None, f"not valid JSON: {reason}"))
        elif loc == ("body",) and err.get("type") in ("model_attributes_type", "dict_type", "missing"):
            sent_text = isinstance(err.get("input"), (bytes, str))
            special.append(field_error("body", None, "must be a JSON object" + (
                " (send it with Content-Type: application/json)" if sent_text else ""),
                getattr(model, "__name__", None)))
        else:
            errors.append(err)
    details = from_error_list(errors, schema).details if errors else []
    profile = ingress_of(request).config.model_profile
    for raw, detail in zip(errors, details):
        # Past the static guard is past the profile's limit too: say it as `build_plan` does.
        if raw.get("type") == "less_than_equal" and (detail["field"].split(".")[-1] in ("duration", "time_s")):
            detail["message"] = duration_limit(profile)[0]
    return InvalidRequest(special + details)


def install_error_boundary(app: FastAPI) -> None:
    """One error shape for everything the app answers."""

    @app.exception_handler(VidgenError)
    async def _vidgen_error(request: Request, exc: VidgenError) -> JSONResponse:
        return error_response(exc, request)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(_validation_details(request, exc), request)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(exc.status_code,
                                                                                         "http_error")
        return error_response(VidgenError(exc.status_code, str(exc.detail), code=code), request)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("internal error (request %s)", request_id(request))
        return error_response(VidgenError(500, "internal error; see the server logs for this request id",
                                          code="internal"), request)


def create_app(ingress: Any) -> FastAPI:
    """The FastAPI app of one ingress replica (Serve calls this through `__serve_build_asgi_app__`)."""
    from . import openai_videos, routes

    app = FastAPI(
        title="vidgen-serve",
        version="0.1.0",
        description="Text-to-video generation (Wan 2.1) on Ray Serve. Authenticate with "
        "`Authorization: Bearer <key>`. OpenAI-style `/v1/videos` routes map onto the same jobs.",
        strict_content_type=False,  # a JSON body without a Content-Type header is still JSON
    )
    app.state.ingress = ingress
    app.add_middleware(BodyLimit, max_bytes=ingress.settings.max_body_bytes)
    app.add_middleware(SyncSlots, ingress=ingress)  # outermost: sheds before anything is read
    install_error_boundary(app)
    app.include_router(routes.router)
    app.include_router(openai_videos.router)
    _publish_profile_bounds(app, ingress.config.model_profile)
    return app


def _publish_profile_bounds(app: FastAPI, profile: Any) -> None:
    """The generated OpenAPI document, with `VideoRequest` bounded by the active profile.

    One source of truth for durations: the profile's `max_duration_s` (as `/v1/schema` and the
    422 messages say), not the request model's static hard limit.
    """
    from fastapi.openapi.utils import get_openapi

    from ..request import request_schema

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, description=app.description,
                               routes=app.routes)
            bounded = dict(request_schema(profile, ref_template="#/components/schemas/{model}"))
            components = spec.setdefault("components", {}).setdefault("schemas", {})
            components.update(bounded.pop("$defs", {}))
            components["VideoRequest"] = bounded
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
