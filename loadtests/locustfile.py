"""Locust load test for vidgen-serve.

    VIDGEN_API_KEY=... locust -f loadtests/locustfile.py --host http://127.0.0.1:8000 \
        --headless -u 4 -r 1 -t 2m

Users mix synchronous generations with async jobs (submit, poll, download). 429/503
answers are the service shedding load as designed: they are reported under their own
name ("overloaded") instead of as failures, so a run shows both throughput and how much
load was turned away. The request sent is `VIDGEN_LOADTEST_REQUEST` (JSON) or a short
480p clip. Loopback hosts only unless `VIDGEN_LOADTEST_ALLOW_REMOTE=1`.
"""

from __future__ import annotations

import json
import os
import time
from urllib.parse import urlparse

from locust import HttpUser, between, events, task

DEFAULT_REQUEST = {"prompt": "a red kite over green hills", "duration": 2, "resolution": "480p"}
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
JOB_POLL_TIMEOUT_S = 300


@events.init.add_listener
def _check_host(environment, **_kwargs):
    # Checked at start-up, before any user exists, so a wrong --host sends nothing.
    host = urlparse(environment.host or "").hostname
    if host not in LOOPBACK and os.environ.get("VIDGEN_LOADTEST_ALLOW_REMOTE") != "1":
        print(f"refusing to load-test {environment.host!r}: loopback only "
              "(set VIDGEN_LOADTEST_ALLOW_REMOTE=1 for a staging cluster you own)")
        os._exit(2)


def _request_body() -> dict:
    raw = os.environ.get("VIDGEN_LOADTEST_REQUEST")
    return json.loads(raw) if raw else dict(DEFAULT_REQUEST)


class VideoUser(HttpUser):
    """One client of the product: mostly sync MP4 calls, some async jobs."""

    wait_time = between(0.5, 2.0)

    def on_start(self) -> None:
        self.client.headers["Authorization"] = f"Bearer {os.environ['VIDGEN_API_KEY']}"
        self.body = _request_body()

    def _shed(self, response) -> bool:
        if response.status_code in (429, 503):
            response.success()
            self.environment.events.request.fire(
                request_type="SHED", name="overloaded", response_time=response.elapsed.total_seconds() * 1000,
                response_length=0, exception=None, context={})
            return True
        return False

    @task(3)
    def generate(self) -> None:
        with self.client.post("/v1/video/generate", json=self.body, name="generate", catch_response=True) as r:
            if self._shed(r):
                return
            if r.status_code != 200 or r.headers.get("content-type") != "video/mp4":
                r.failure(f"status {r.status_code}: {r.text[:200]}")

    @task(1)
    def job(self) -> None:
        with self.client.post("/v1/video/jobs", json=self.body, name="jobs: submit", catch_response=True) as r:
            if self._shed(r):
                return
            if r.status_code != 202:
                r.failure(f"status {r.status_code}: {r.text[:200]}")
                return
            job_id = r.json()["job_id"]
        deadline = time.monotonic() + JOB_POLL_TIMEOUT_S
        while time.monotonic() < deadline:
            state = self.client.get(f"/v1/video/jobs/{job_id}", name="jobs: status").json()["state"]
            if state in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(1)
        else:
            state = "timeout"
        if state != "succeeded":
            self.environment.events.request.fire(request_type="JOB", name="jobs: finished", response_time=0,
                                                 response_length=0, exception=RuntimeError(state), context={})
            return
        self.client.get(f"/v1/video/jobs/{job_id}/content", name="jobs: content")
