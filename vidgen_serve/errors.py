"""One error type for the whole product, and its mapping to a JSON error body.

A `VidgenError` carries the HTTP status, a message safe to show the client, and
structured details (e.g. which field was wrong and what is allowed). Anything else that
escapes a handler is an internal error: logged in full, shown to the client as a 500
without internals.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError


class VidgenError(Exception):
    """An error with an HTTP status and a client-safe message.

    Args:
        status_code: HTTP status to answer with.
        message: client-facing message.
        code: short machine-readable error code.
        details: structured, client-safe details (e.g. field errors).
        headers: extra response headers (e.g. Retry-After).
    """

    def __init__(
        self,
        status_code: int,
        message: str,
        code: str = "error",
        details: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.code = code
        self.details = details or []
        self.headers = headers or {}

    def __reduce__(self):
        # Pickle by state, not by constructor args (subclasses take other arguments): the
        # error crosses Ray from a stage replica to the ingress intact, status code included.
        return _rebuild_error, (self.__class__, self.message, dict(self.__dict__))


def _rebuild_error(cls: type, message: str, state: dict[str, Any]) -> "VidgenError":
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.__dict__.update(state)
    return error


class InvalidRequest(VidgenError):
    """422: a request field is invalid. `details` names each field, value and allowed range."""

    def __init__(self, details: list[dict[str, Any]]):
        summary = "; ".join(f"{d['field']}: {d['message']}" for d in details)
        super().__init__(422, f"invalid request: {summary}", code="invalid_request", details=details)


def field_error(field: str, value: Any, message: str, allowed: Any = None) -> dict[str, Any]:
    """One entry of an `InvalidRequest`'s details."""
    entry = {"field": field, "value": _safe_value(value), "message": message}
    if allowed is not None:
        entry["allowed"] = allowed
    return entry


class GenerationCancelled(VidgenError):
    """The job was cancelled; raised at a denoising step boundary."""

    def __init__(self, message: str = "generation cancelled"):
        super().__init__(409, message, code="cancelled")


MAX_ECHO_CHARS = 200


def _safe_value(value: Any) -> Any:
    """A bad input as the error echoes it: JSON values as they are while short, else cut.

    Never a Python repr (a dict or list stays a JSON object or array), and never a huge
    input echoed into logs or responses.
    """
    if isinstance(value, (int, float, bool)) or value is None:
        return value
    if isinstance(value, str):
        return value if len(value) <= MAX_ECHO_CHARS else value[:MAX_ECHO_CHARS] + "…"
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = str(value)
    else:
        if len(text) <= MAX_ECHO_CHARS:
            return value
    return text[:MAX_ECHO_CHARS] + "…" if len(text) > MAX_ECHO_CHARS else text


def _allowed_from_schema(schema: dict[str, Any]) -> Any:
    if "enum" in schema:
        return schema["enum"]
    if "const" in schema:
        return [schema["const"]]
    lo = schema.get("minimum", schema.get("exclusiveMinimum"))
    hi = schema.get("maximum", schema.get("exclusiveMaximum"))
    if lo is not None or hi is not None:
        return f"{lo if lo is not None else '-inf'}..{hi if hi is not None else 'inf'}"
    lo, hi = schema.get("minLength"), schema.get("maxLength")
    if lo is not None or hi is not None:
        return f"length {lo or 0}..{hi if hi is not None else 'inf'}"
    lo, hi = schema.get("minItems"), schema.get("maxItems")
    if lo is not None or hi is not None:
        return f"{lo or 0}..{hi if hi is not None else 'inf'} items"
    for option in schema.get("anyOf", []):
        allowed = _allowed_from_schema(option)
        if allowed is not None:
            return allowed
    return None


def _field_schema(model_schema: dict[str, Any], loc: tuple) -> dict[str, Any]:
    """Walk a JSON Schema along a pydantic error location (fields, list indexes, $refs).

    Optional fields are `anyOf: [<schema>, null]`: at each step the option that has what
    the next location part needs (`items` for a list index, `properties` for a name) is
    taken, e.g. `keyframes.0.time_s` -> anyOf -> array items -> $ref Keyframe -> time_s.
    """
    defs = model_schema.get("$defs", {})

    def resolve(node: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in node:
            node = defs.get(node["$ref"].split("/")[-1], {})
        return node

    node: dict[str, Any] = model_schema
    for part in loc:
        node = resolve(node)
        key = "items" if isinstance(part, int) else "properties"
        if key not in node:
            for option in node.get("anyOf", []):
                option = resolve(option)
                if key in option:
                    node = option
                    break
        if isinstance(part, int):
            node = node.get("items", {})
        else:
            node = node.get("properties", {}).get(part, {})
    return resolve(node)


def from_validation_error(exc: ValidationError, model_schema: dict[str, Any] | None = None) -> InvalidRequest:
    """Turn a pydantic ValidationError into an `InvalidRequest` naming fields and allowed values."""
    return from_error_list(exc.errors(include_url=False), model_schema)


def from_error_list(errors: Any, model_schema: dict[str, Any] | None = None) -> InvalidRequest:
    """`from_validation_error` for pydantic's error dicts (e.g. FastAPI's `RequestValidationError.errors()`)."""
    details = []
    for err in errors:
        loc = tuple(p for p in err["loc"] if p not in ("body",))
        field = ".".join(str(p) for p in loc) or "body"
        value = err.get("input")
        allowed = None
        if model_schema is not None and loc:
            allowed = _allowed_from_schema(_field_schema(model_schema, loc))
        if err["type"] == "missing":
            value = None  # the input pydantic has is the enclosing object, not this field's
        if err["type"] == "extra_forbidden":
            parent = _field_schema(model_schema, loc[:-1]) if model_schema and loc else {}
            allowed = sorted(parent.get("properties", {})) or None
            message = "unknown field"
        else:
            message = err["msg"]
        ctx = err.get("ctx") or {}
        if "field" in ctx:
            # A model-level check that names the field it is about (e.g. a keyframe past the duration).
            field, value, allowed = ctx["field"], ctx.get("value"), ctx.get("allowed")
        details.append(field_error(field, value, message, allowed))
    return InvalidRequest(details)


def error_body(exc: VidgenError, request_id: str | None) -> dict[str, Any]:
    """The JSON error shape used by every endpoint."""
    return {
        "error": {
            "code": exc.code,
            "message": exc.message,
            "details": exc.details,
            "request_id": request_id,
        }
    }
