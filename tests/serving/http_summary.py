"""What an assertion about an HTTP response prints: a short text summary, never a binary body.

`assert r.status_code == 200, summary(r)`: a JSON or text body is shown (cut to a few
hundred characters); an MP4 (or any other binary body) only by type and size.
"""

from __future__ import annotations

import httpx

TEXT_TYPES = ("application/json", "text/", "application/problem+json")


def summary(resp: httpx.Response, limit: int = 500) -> str:
    """``HTTP <status> <content-type>: <text>`` or ``... <n> bytes (binary body not shown)``."""
    ctype = resp.headers.get("content-type", "")
    head = f"HTTP {resp.status_code} {ctype or '(no content-type)'}"
    if ctype.startswith(TEXT_TYPES):
        text = resp.text
        return f"{head}: {text[:limit]}{'…' if len(text) > limit else ''}"
    return f"{head}: {len(resp.content)} bytes (binary body not shown)"


def summaries(responses) -> list[str]:
    """`summary` of each response."""
    return [summary(r) for r in responses]
