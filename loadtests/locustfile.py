"""Locust load test for vidgen-serve.

    make loadtest                          # the runner: starts the tiny service, runs, reports
    VIDGEN_API_KEY=... locust -f loadtests/locustfile.py --host http://127.0.0.1:8000 \
        --headless -u 4 -r 1 -t 2m         # by hand, against a running service

Two kinds of users: `SyncUser` calls POST /v1/video/generate; `JobUser` submits an async job,
polls it and downloads the MP4. Both send a share of invalid requests (each user's first
call, then every 1/invalid_share-th) that must be refused with a 4xx. Requests are drawn from
a mix of durations, resolutions, styles and controls. Answers that shed load (429, or 503 with retry advice) are recorded under
"<name> (shed <status>)" as successes: the run shows throughput, latency and how much load
was turned away; any other unexpected status (a 5xx) is a failure.

Environment (JSON values; the runner sets them from loadtests/scenarios.yaml):
  VIDGEN_API_KEY            the bearer key (required)
  VIDGEN_LOADTEST_MIX       request mix, see loadtests/common.py DEFAULT_MIX
  VIDGEN_LOADTEST_REQUEST   one fixed request instead of the mix
  VIDGEN_LOADTEST_USERS     user class weights, e.g. {"SyncUser": 3, "JobUser": 1}
  VIDGEN_LOADTEST_STAGES    [{"name", "until_s", "users", "spawn_rate"}, ...] for the
                            ramp / spike / soak shape; without it -u/-r/-t apply
  VIDGEN_LOADTEST_SEED      seed of the request mix
Loopback hosts only unless VIDGEN_LOADTEST_ALLOW_REMOTE=1.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time

from locust import HttpUser, LoadTestShape, between, events

from loadtests.common import DEFAULT_MIX, INVALID_REQUESTS, check_target, is_shed, make_request

JOB_POLL_TIMEOUT_S = 300
JOB_POLL_INTERVAL_S = 1.0
FINAL_STATES = ("succeeded", "failed", "cancelled")


def _env_json(name: str, default):
    raw = os.environ.get(name)
    return json.loads(raw) if raw else default


MIX = {**DEFAULT_MIX, **_env_json("VIDGEN_LOADTEST_MIX", {})}
FIXED_REQUEST = _env_json("VIDGEN_LOADTEST_REQUEST", None)
WEIGHTS = _env_json("VIDGEN_LOADTEST_USERS", {"SyncUser": 3, "JobUser": 1})
STAGES = _env_json("VIDGEN_LOADTEST_STAGES", [])
_seed = random.Random(int(os.environ.get("VIDGEN_LOADTEST_SEED", "0")))


@events.init.add_listener
def _check_host(environment, **_kwargs):
    # Checked at start-up, before any user exists, so a wrong --host sends nothing.
    try:
        check_target(environment.host or "")
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        os._exit(2)


class VidgenUser(HttpUser):
    """A client with a key; every call is judged the same way (expected, shed or failed)."""

    abstract = True
    wait_time = between(0.5, 2.0)

    def on_start(self) -> None:
        self.client.headers["Authorization"] = f"Bearer {os.environ['VIDGEN_API_KEY']}"
        self.rng = random.Random(_seed.random())
        self.calls = 0

    def body(self) -> dict:
        return dict(FIXED_REQUEST) if FIXED_REQUEST else make_request(MIX, self.rng)

    def call(self, method: str, path: str, name: str, expect: tuple[int, ...], **kwargs):
        """One request; returns the response when its status is expected, else None."""
        with self.client.request(method, path, name=name, catch_response=True, **kwargs) as r:
            if r.status_code in expect:
                r.success()
                return r
            try:
                payload = r.json()
            except ValueError:
                payload = None
            if is_shed(r.status_code, r.headers, payload):
                r.request_meta["name"] = f"{name} (shed {r.status_code})"
                r.success()
            else:
                r.failure(f"status {r.status_code}: {r.text[:200]}")
            return None

    def invalid(self) -> None:
        """A request that breaks the contract: anything but a 4xx is a failure."""
        body = dict(self.rng.choice(INVALID_REQUESTS))
        with self.client.post("/v1/video/generate", json=body, name="invalid", catch_response=True) as r:
            if 400 <= r.status_code < 500 and r.status_code != 429:
                r.success()
            elif is_shed(r.status_code, r.headers, None):
                # Shedding comes first (before the body is read): at capacity even an invalid
                # request gets 429/503 + Retry-After, which is load shed, not a failure.
                r.request_meta["name"] = f"invalid (shed {r.status_code})"
                r.success()
            else:
                r.failure(f"invalid request got {r.status_code}, expected 4xx: {body}")


def _tasks(main):
    """One task that interleaves invalid requests at the mix's share, deterministically: a
    user's 1st call is invalid, then every round(1 / share)-th. Random task weights could send
    none at all in a short run on a slow machine."""
    share = float(MIX.get("invalid_share", 0))
    period = max(1, round(1 / share)) if share > 0 else 0

    def task(user: VidgenUser) -> None:
        turn = user.calls
        user.calls += 1
        if period and turn % period == 0:
            user.invalid()
        else:
            main(user)

    task.__name__ = main.__name__
    return [task]


def _generate(user: VidgenUser) -> None:
    r = user.call("POST", "/v1/video/generate", "generate", (200,), json=user.body())
    if r is not None and r.headers.get("content-type") != "video/mp4":
        user.environment.events.request.fire(request_type="CHECK", name="generate: mp4", response_time=0,
                                             response_length=0, context={},
                                             exception=RuntimeError(r.headers.get("content-type")))


def _job(user: VidgenUser) -> None:
    r = user.call("POST", "/v1/video/jobs", "jobs: submit", (202,), json=user.body())
    if r is None:
        return
    job_id = r.json()["job_id"]
    started, state = time.monotonic(), "timeout"
    while time.monotonic() - started < JOB_POLL_TIMEOUT_S:
        status = user.call("GET", f"/v1/video/jobs/{job_id}", "jobs: status", (200,))
        if status is not None and status.json()["state"] in FINAL_STATES:
            state = status.json()["state"]
            break
        time.sleep(JOB_POLL_INTERVAL_S)
    # The job as a whole, submit to final state, is one entry too.
    user.environment.events.request.fire(
        request_type="JOB", name="jobs: finished", response_time=(time.monotonic() - started) * 1000,
        response_length=0, context={}, exception=None if state == "succeeded" else RuntimeError(state))
    if state == "succeeded":
        content = user.call("GET", f"/v1/video/jobs/{job_id}/content", "jobs: content", (200,))
        if content is not None and not content.content[4:8] == b"ftyp":
            user.environment.events.request.fire(request_type="CHECK", name="jobs: content mp4", response_time=0,
                                                 response_length=0, context={},
                                                 exception=RuntimeError("not an MP4"))


class SyncUser(VidgenUser):
    """POST /v1/video/generate and wait for the MP4."""

    weight = int(WEIGHTS.get("SyncUser", 0))
    tasks = _tasks(_generate)


class JobUser(VidgenUser):
    """Submit a job, poll it to a final state, download the MP4."""

    weight = int(WEIGHTS.get("JobUser", 0))
    tasks = _tasks(_job)


class StagedShape(LoadTestShape):
    """Ramp, spike and soak stages from VIDGEN_LOADTEST_STAGES; without them, -u/-r/-t as usual."""

    use_common_options = True

    def tick(self):
        if not STAGES:
            options = self.runner.environment.parsed_options
            return (options.num_users or 1, options.spawn_rate or 1)
        elapsed = self.get_run_time()
        for stage in STAGES:
            if elapsed < stage["until_s"]:
                return (int(stage["users"]), float(stage["spawn_rate"]))
        return None
