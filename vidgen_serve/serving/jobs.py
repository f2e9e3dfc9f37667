"""Async job records and artifacts.

`JobStore` is the interface (a Redis store can serve a multi-node cluster later);
`SQLiteJobStore` is the default. Job ids are server-generated UUIDs: artifact paths are
derived from them only, never from user input.

Jobs survive restarts: every running job carries its owner (an ingress replica) and a
heartbeat. A job whose owner stopped heartbeating is recovered by a live replica: run
again from its stored plan (same seed, so the same video) while it has attempts left,
else marked failed with the reason. Nothing accepted is silently lost.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
FINAL_STATES = (SUCCEEDED, FAILED, CANCELLED)


@dataclass
class Job:
    """One async generation job."""

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
    warnings: list[str] = field(default_factory=list)

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
        }


class JobStore(ABC):
    """Where job records live. All methods are safe to call from several threads."""

    @abstractmethod
    def create(self, request: dict[str, Any], plan: dict[str, Any], key_id: str,
               warnings: list[str] | None = None) -> Job: ...

    @abstractmethod
    def get(self, job_id: str) -> Job | None: ...

    @abstractmethod
    def update(self, job_id: str, **fields: Any) -> None: ...

    @abstractmethod
    def claim(self, job_id: str, owner: str) -> bool:
        """Move a queued job to running under `owner`; False if it is not queued (e.g. cancelled)."""

    @abstractmethod
    def heartbeat(self, owner: str) -> None:
        """Mark every running job of `owner` alive."""

    @abstractmethod
    def recover_stale(self, stale_after_s: float, max_attempts: int) -> list[Job]:
        """Jobs whose owner went silent: re-queued (returned) or failed when out of attempts."""

    @abstractmethod
    def queued(self) -> list[Job]:
        """Queued jobs, oldest first."""

    @abstractmethod
    def counts(self) -> dict[str, int]:
        """Number of jobs per state."""


_COLUMNS = ("id", "state", "request", "plan", "key_id", "stage", "progress", "timings", "error", "created_at",
            "updated_at", "owner", "heartbeat_at", "attempts", "cancel_requested", "warnings")
_JSON = {"request", "plan", "progress", "timings", "warnings"}


class SQLiteJobStore(JobStore):
    """Job records in one SQLite file (WAL mode; several processes on one node may share it)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, check_same_thread=False, timeout=30, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute(
            """CREATE TABLE IF NOT EXISTS jobs (
                id TEXT PRIMARY KEY, state TEXT NOT NULL, request TEXT NOT NULL, plan TEXT NOT NULL,
                key_id TEXT NOT NULL, stage TEXT, progress TEXT NOT NULL, timings TEXT NOT NULL, error TEXT,
                created_at REAL NOT NULL, updated_at REAL NOT NULL, owner TEXT, heartbeat_at REAL,
                attempts INTEGER NOT NULL DEFAULT 0, cancel_requested INTEGER NOT NULL DEFAULT 0,
                warnings TEXT NOT NULL DEFAULT '[]')"""
        )
        # Databases created before the `warnings` column get it (existing jobs: none).
        columns = {row[1] for row in self._conn.execute("PRAGMA table_info(jobs)")}
        if "warnings" not in columns:
            try:
                self._conn.execute("ALTER TABLE jobs ADD COLUMN warnings TEXT NOT NULL DEFAULT '[]'")
            except sqlite3.OperationalError as exc:  # another replica added it first
                if "duplicate column" not in str(exc):
                    raise
        self._conn.execute("CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, created_at)")

    def _row(self, row: tuple) -> Job:
        data = dict(zip(_COLUMNS, row))
        for key in _JSON:
            data[key] = json.loads(data[key])
        data["cancel_requested"] = bool(data["cancel_requested"])
        return Job(**data)

    def _select(self, where: str, args: tuple = ()) -> list[Job]:
        with self._lock:
            rows = self._conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE {where}", args).fetchall()
        return [self._row(r) for r in rows]

    def create(self, request: dict[str, Any], plan: dict[str, Any], key_id: str,
               warnings: list[str] | None = None) -> Job:
        now = time.time()
        job = Job(id=uuid.uuid4().hex, state=QUEUED, request=request, plan=plan, key_id=key_id,
                  stage="queued", created_at=now, updated_at=now, warnings=list(warnings or []))
        values = [json.dumps(getattr(job, c)) if c in _JSON else getattr(job, c) for c in _COLUMNS]
        with self._lock:
            self._conn.execute(
                f"INSERT INTO jobs ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})", values
            )
        return job

    def get(self, job_id: str) -> Job | None:
        jobs = self._select("id = ?", (job_id,))
        return jobs[0] if jobs else None

    def update(self, job_id: str, **fields: Any) -> None:
        unknown = set(fields) - set(_COLUMNS)
        if unknown:
            raise ValueError(f"unknown job fields: {sorted(unknown)}")
        fields["updated_at"] = time.time()
        values = [json.dumps(v) if k in _JSON else v for k, v in fields.items()]
        with self._lock:
            self._conn.execute(
                f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in fields)} WHERE id = ?", (*values, job_id)
            )

    def claim(self, job_id: str, owner: str) -> bool:
        now = time.time()
        with self._lock:
            cur = self._conn.execute(
                "UPDATE jobs SET state = ?, owner = ?, heartbeat_at = ?, updated_at = ?, attempts = attempts + 1 "
                "WHERE id = ? AND state = ? AND cancel_requested = 0",
                (RUNNING, owner, now, now, job_id, QUEUED),
            )
        return cur.rowcount == 1

    def heartbeat(self, owner: str) -> None:
        with self._lock:
            self._conn.execute(
                "UPDATE jobs SET heartbeat_at = ? WHERE owner = ? AND state = ?", (time.time(), owner, RUNNING)
            )

    def recover_stale(self, stale_after_s: float, max_attempts: int) -> list[Job]:
        now = time.time()
        cutoff = now - stale_after_s
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.execute(
                    "UPDATE jobs SET state = ?, stage = NULL, error = ?, updated_at = ? "
                    "WHERE state = ? AND heartbeat_at < ? AND attempts >= ?",
                    (FAILED, "interrupted: the replica running this job stopped, and it is out of attempts",
                     now, RUNNING, cutoff, max_attempts),
                )
                self._conn.execute(
                    "UPDATE jobs SET state = ?, stage = 'queued', owner = NULL, progress = '{}', "
                    "error = 'resumed after the replica running it stopped', updated_at = ? "
                    "WHERE state = ? AND heartbeat_at < ?",
                    (QUEUED, now, RUNNING, cutoff),
                )
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        return self.queued()

    def queued(self) -> list[Job]:
        return self._select("state = ? ORDER BY created_at", (QUEUED,))

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        return {state: n for state, n in rows}


class LocalArtifactStore:
    """Finished MP4s in a local directory, named by job id only."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, job_id: str) -> Path:
        if not (len(job_id) == 32 and all(c in "0123456789abcdef" for c in job_id)):
            raise ValueError("invalid job id")
        return self.root / f"{job_id}.mp4"

    def put(self, job_id: str, data: bytes) -> Path:
        """Write atomically (temp file + rename): a reader never sees half a video."""
        target = self.path(job_id)
        tmp = target.with_suffix(".part")
        tmp.write_bytes(data)
        os.replace(tmp, target)
        return target

    def exists(self, job_id: str) -> bool:
        return self.path(job_id).exists()
