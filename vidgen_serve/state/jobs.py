"""The async job-store interface: job records, atomic claims, heartbeats, recovery, cancel.

Every method is a coroutine and never blocks the event loop (the SQLite backend runs its
calls on a worker thread, the Redis backend uses redis-py's asyncio client). Job ids are
server-generated UUIDs: artifact keys are derived from them only, never from user input.

Lifecycle: `create` (queued) -> `claim` (running under one owner, attempts + 1) ->
`finish` (succeeded / failed / cancelled, only by the owner that still holds it). A
running job's owner calls `heartbeat` every `job_heartbeat_s`; `recover_stale` re-queues
(or fails, when out of attempts) jobs whose owner went silent, in one atomic step, so
exactly one live replica resumes each of them. `cancel` cancels a queued job at once and
flags a running one; its owner sees the flag (`cancel_requested`) and stops at the next
step boundary.
"""

from __future__ import annotations

import re
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..errors import VidgenError

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
FINAL_STATES = (SUCCEEDED, FAILED, CANCELLED)
JOB_ID_RE = re.compile(r"^[0-9a-f]{32}$")

RECOVERED_ERROR = "resumed after the replica running it stopped"
OUT_OF_ATTEMPTS_ERROR = "interrupted: the replica running this job stopped, and it is out of attempts"


@dataclass
class Job:
    """One async generation job, as stored."""

    id: str
    state: str
    request: dict[str, Any]
    plan: dict[str, Any]
    key_id: str
    stage: str | None = None
    progress: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    owner: str | None = None
    heartbeat_at: float | None = None
    attempts: int = 0
    cancel_requested: bool = False
    artifact: str | None = None
    warnings: list[str] = field(default_factory=list)
    quality: dict[str, float] = field(default_factory=dict)  # the video's metrics (media.quality), once done

    def public(self) -> dict[str, Any]:
        """The job as `GET /v1/video/jobs/{id}` shows it."""
        return {
            "job_id": self.id,
            "state": self.state,
            "stage": self.stage,
            "progress": self.progress,
            "timings": self.timings,
            "error": self.error,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "attempts": self.attempts,
            "seed": self.plan.get("seed"),
            "warnings": self.warnings,
            "quality": self.quality,
        }


# Fields a job's owner may change while it runs (`update`); the rest move only through
# the state transitions below, each of them atomic in the backend.
PROGRESS_FIELDS = frozenset({"stage", "progress", "timings", "error"})


class StoreUnavailable(VidgenError):
    """503: the job store cannot be reached right now (the client may retry)."""

    def __init__(self, what: str, retry_after_s: int = 5):
        super().__init__(503, f"the job store is unavailable ({what}); retry later", code="store_unavailable",
                         headers={"Retry-After": str(retry_after_s)})


def new_job_id() -> str:
    return uuid.uuid4().hex


class JobStore(ABC):
    """Where job records live; one instance per process (or per event loop)."""

    #: The store's URL without credentials (for messages and logs).
    url: str

    @abstractmethod
    async def start(self) -> None:
        """Connect and prepare the schema. Raises `StoreUnavailable` naming the URL if it cannot."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections."""

    @abstractmethod
    async def create(self, request: dict[str, Any], plan: dict[str, Any], key_id: str,
                     warnings: list[str] | None = None) -> Job:
        """Store a new queued job (`warnings`: request fields accepted but not yet applied)."""

    @abstractmethod
    async def get(self, job_id: str) -> Job | None:
        """The job, or None."""

    @abstractmethod
    async def list(self, key_id: str, limit: int = 20, after: str | None = None) -> list[Job]:
        """Jobs of one API key, newest first; `after` is the id of the last job of the previous page."""

    @abstractmethod
    async def update(self, job_id: str, owner: str, **fields: Any) -> bool:
        """Set progress fields (`PROGRESS_FIELDS`) of a running job `owner` holds; False if it does not."""

    @abstractmethod
    async def claim(self, owner: str, limit: int = 1) -> list[Job]:
        """Atomically move up to `limit` of the oldest queued jobs to running under `owner`."""

    @abstractmethod
    async def finish(self, job_id: str, owner: str, state: str, *, error: str | None = None,
                     timings: dict[str, float] | None = None, artifact: str | None = None,
                     quality: dict[str, float] | None = None) -> bool:
        """End a running job `owner` holds in a final state; False if `owner` no longer holds it.
        `timings` and `quality` (the video's metrics) are kept as they were when None."""

    @abstractmethod
    async def heartbeat(self, owner: str, job_ids: list[str]) -> set[str]:
        """Mark `owner`'s running jobs alive. Returns the ids among `job_ids` it still holds."""

    @abstractmethod
    async def recover_stale(self, stale_after_s: float, max_attempts: int) -> tuple[list[str], list[str]]:
        """Jobs whose owner has been silent for `stale_after_s`: re-queued when they have attempts
        left, else failed with the reason. Returns (requeued ids, failed ids); atomic."""

    @abstractmethod
    async def cancel(self, job_id: str) -> Job | None:
        """Cancel: a queued job becomes cancelled at once, a running one is flagged for its owner."""

    @abstractmethod
    async def cancel_requested(self, job_ids: list[str]) -> set[str]:
        """The ids among `job_ids` whose cancel was requested."""

    @abstractmethod
    async def delete(self, job_id: str) -> bool:
        """Remove a job that has ended (final state); False if it is absent or still active."""

    @abstractmethod
    async def counts(self) -> dict[str, int]:
        """Number of queued and running jobs (keys `queued`, `running`)."""

    async def queue_depth(self) -> int:
        """Jobs waiting to be claimed."""
        return (await self.counts()).get(QUEUED, 0)


class StoreURLError(ValueError):
    """A `job_store` / `artifact_store` setting that is not a URL this product understands."""


def parse_job_store_url(url: str | None, state_dir: Path) -> tuple[str, str]:
    """(`"sqlite"`, path) or (`"redis"`, url) for a `job_store` setting.

    None means SQLite at `<state_dir>/jobs.sqlite3`.
    """
    if url is None:
        return "sqlite", str(state_dir / "jobs.sqlite3")
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        # sqlite:///relative/or/absolute (the three-slash form SQLAlchemy uses: path after "///")
        path = url[len("sqlite:///"):] if url.startswith("sqlite:///") else ""
        if not path or parts.netloc:
            raise StoreURLError(f"job_store {url!r}: use sqlite:///path/to/jobs.sqlite3")
        return "sqlite", path
    if parts.scheme in ("redis", "rediss"):
        try:
            parts.port  # noqa: B018 - urlsplit validates the port only when it is read
        except ValueError:
            raise StoreURLError(f"job_store {redact(url)!r}: the port is not a number") from None
        if not parts.hostname:
            raise StoreURLError(f"job_store {redact(url)!r}: no host (use redis://host:port/db)")
        db = parts.path.strip("/")
        if db and not db.isdigit():
            raise StoreURLError(f"job_store {redact(url)!r}: the database must be a number (redis://host:port/0)")
        return "redis", url
    raise StoreURLError(f"job_store {redact(url)!r}: unknown scheme {parts.scheme!r} "
                        "(allowed: sqlite:///path, redis://host:port/db, rediss://host:port/db)")


def redact(url: str) -> str:
    """The URL without its password (for errors and logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return parts._replace(netloc=netloc).geturl()


def open_job_store(url: str | None, state_dir: Path, *, namespace: str = "vidgen") -> JobStore:
    """The job store a `job_store` setting names (not yet started: `await store.start()`).

    Args:
        url: None (SQLite under `state_dir`), `sqlite:///path`, `redis://host:port/db` or `rediss://...`.
        state_dir: the default location of the SQLite file.
        namespace: Redis key prefix (several applications may share one Redis).
    """
    kind, where = parse_job_store_url(url, state_dir)
    if kind == "sqlite":
        from .sqlite import SQLiteJobStore

        return SQLiteJobStore(where)
    from .redis import RedisJobStore

    return RedisJobStore(where, namespace=namespace)
