"""What the Locust file and the runner share: which hosts may be loaded, what a request looks
like, and which answers count as load shedding rather than failures."""

from __future__ import annotations

import ipaddress
import os
import random
from typing import Any
from urllib.parse import urlparse

ALLOW_REMOTE_ENV = "VIDGEN_LOADTEST_ALLOW_REMOTE"

# The request mix when a scenario gives none: short, small clips (the tiny profile on CPU).
DEFAULT_MIX: dict[str, Any] = {
    "prompts": ["a red kite over green hills", "一只橘猫在樱花树下追逐蝴蝶", "waves on a rocky shore at dusk"],
    "duration": [1, 2],
    "resolution": ["480p"],
    "style": ["realistic", "anime", "cinematic"],
    "controls": {
        "motion_intensity": [0.5, 1.0],
        "camera_motion": ["static", "pan", "zoom"],
        "color_palette": ["warm", "cool", "neutral"],
    },
    "num_inference_steps": [2],
    "invalid_share": 0.05,
}

# Requests the service must refuse with a 4xx (each breaks one rule of the request contract).
INVALID_REQUESTS: list[dict[str, Any]] = [
    {"prompt": "too long", "duration": 10_000},
    {"prompt": "bad size", "resolution": "16k"},
    {"prompt": "bad style", "style": "no-such-style"},
    {"prompt": "bad fps", "fps": 500},
    {"duration": 2},  # no prompt
    {"prompt": "unknown field", "colour": "red"},
]


def is_loopback(url: str) -> bool:
    """True when `url`'s host is this machine (127.0.0.0/8, ::1 or localhost)."""
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def remote_allowed() -> bool:
    return os.environ.get(ALLOW_REMOTE_ENV) == "1"


def check_target(url: str, allow_remote: bool = False) -> None:
    """Refuse to load anything but loopback unless explicitly allowed (ValueError naming the host)."""
    if not is_loopback(url) and not (allow_remote or remote_allowed()):
        raise ValueError(f"refusing to load-test {url!r}: loopback hosts only (127.0.0.1, localhost, ::1); "
                         f"pass --allow-remote or set {ALLOW_REMOTE_ENV}=1 for a staging cluster you own")


def make_request(mix: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """One valid generation request drawn from the mix (durations, resolutions, styles, controls)."""
    body: dict[str, Any] = {
        "prompt": rng.choice(mix["prompts"]),
        "duration": rng.choice(mix["duration"]),
        "resolution": rng.choice(mix["resolution"]),
        "style": rng.choice(mix["style"]),
    }
    for name, values in (mix.get("controls") or {}).items():
        body[name] = rng.choice(values)
    if mix.get("num_inference_steps"):
        body["num_inference_steps"] = rng.choice(mix["num_inference_steps"])
    return body


SHED_CODES = ("overloaded", "stage_unavailable")


def is_shed(status: int, headers: Any, body: Any) -> bool:
    """An answer that turns load away on purpose: 429, or a 503 whose error code is in `SHED_CODES`.

    A 503 for a failed stage (or an injected fault) is a failure, as is every other 5xx; without
    a JSON body, a 503 with Retry-After counts as shedding.
    """
    if status == 429:
        return True
    if status != 503:
        return False
    # Every 503 carries Retry-After (an injected fault too), so the error code decides where there
    # is one: a full queue or a replica being replaced is retry advice; anything else failed.
    code = (body or {}).get("error", {}).get("code") if isinstance(body, dict) else None
    if code is not None:
        return code in SHED_CODES
    return "retry-after" in {k.lower() for k in headers}
