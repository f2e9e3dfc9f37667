"""Helpers of the tests that start a live Ray Serve application: the API keys its replicas see,
and the wait for `/readyz`."""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Callable, Iterator

import httpx


@contextlib.contextmanager
def api_keys_env(keys: str) -> Iterator[None]:
    """`VIDGEN_API_KEYS` set to `keys` inside the block, and put back as it was (set or unset) after it.

    Replicas inherit the environment of the process that starts Ray: start Ray inside the block.
    """
    saved = os.environ.get("VIDGEN_API_KEYS")
    os.environ["VIDGEN_API_KEYS"] = keys
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("VIDGEN_API_KEYS", None)
        else:
            os.environ["VIDGEN_API_KEYS"] = saved


def wait_until_ready(client: httpx.Client, timeout_s: float, describe: Callable[[], Any] | None = None) -> None:
    """Poll `GET /readyz` until it answers 200; a refused connection (the proxy still starting) counts as
    not ready. Past `timeout_s` the assertion fails with `describe()` (e.g. `serve.status()`) when given."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if client.get("/readyz", timeout=10).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, (f"/readyz never became 200 in {timeout_s:g}s"
                                             + (f": {describe()}" if describe is not None else ""))
        time.sleep(0.5)
