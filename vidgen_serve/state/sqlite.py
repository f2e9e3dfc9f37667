"""SQLite job store: the embedded default for a single node (`make run` needs nothing else).

One `sqlite3` connection lives on one worker thread; every store call runs there as one
function, so a multi-statement transaction is never interleaved with another call and the
event loop never waits on the disk. Several processes on one node may share the file (WAL
mode; claims and recoveries are single statements or `BEGIN IMMEDIATE` transactions, so
they are atomic across processes). WAL needs a local disk: a shared network volume is
not supported; use Redis for a cluster.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, TypeVar

from .jobs import (CANCELLED, FAILED, FINAL_STATES, OUT_OF_ATTEMPTS_ERROR, PROGRESS_FIELDS, QUEUED,
                   RECOVERED_ERROR, RUNNING, Job, JobStore, StoreUnavailable, new_job_id)

T = TypeVar("T")

_COLUMNS = ("id", "state", "request", "plan", "key_id", "stage", "progress", "timings", "error", "created_at",
            "updated_at", "owner", "heartbeat_at", "attempts", "cancel_requested", "artifact",
            "warnings", "quality")
_JSON = frozenset({"request", "plan", "progress", "timings", "warnings", "quality"})
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM jobs"
_SCHEMA = """CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, state TEXT NOT NULL, request TEXT NOT NULL, plan TEXT NOT NULL,
    key_id TEXT NOT NULL, stage TEXT, progress TEXT NOT NULL, timings TEXT NOT NULL, error TEXT,
    created_at REAL NOT NULL, updated_at REAL NOT NULL, owner TEXT, heartbeat_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0, cancel_requested INTEGER NOT NULL DEFAULT 0, artifact TEXT,
    warnings TEXT NOT NULL DEFAULT '[]', quality TEXT NOT NULL DEFAULT '{}')"""


def _to_job(row: tuple) -> Job:
    data = dict(zip(_COLUMNS, row))
    for key in _JSON:
        data[key] = json.loads(data[key])
    data["cancel_requested"] = bool(data["cancel_requested"])
    return Job(**data)


class SQLiteJobStore(JobStore):
    """Job records in one SQLite file.

    Args:
        path: the database file (its directory is created).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.url = f"sqlite:///{self.path}"
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jobstore-sqlite")
        self._conn: sqlite3.Connection | None = None

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        except sqlite3.OperationalError as exc:  # locked past the timeout, disk gone, ...
            raise StoreUnavailable(f"{self.url}: {exc}") from exc

    # ---- connection (worker thread) -----------------------------------------------------

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes
        conn.execute(_SCHEMA)
        columns = {row[1] for row in conn.execute("PRAGMA table_info(jobs)")}
        if "artifact" not in columns:  # a database written before artifacts had keys
            conn.execute("ALTER TABLE jobs ADD COLUMN artifact TEXT")
        if "warnings" not in columns:  # a database written before jobs had warnings (none)
            conn.execute("ALTER TABLE jobs ADD COLUMN warnings TEXT NOT NULL DEFAULT '[]'")
        if "quality" not in columns:  # a database written before jobs had quality metrics (none)
            conn.execute("ALTER TABLE jobs ADD COLUMN quality TEXT NOT NULL DEFAULT '{}'")
        conn.execute("CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, created_at)")
        conn.execute("CREATE INDEX IF NOT EXISTS jobs_key ON jobs(key_id, created_at)")
        self._conn = conn

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreUnavailable(f"{self.url}: not started")
        return self._conn

    def _transaction(self, body: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._db()
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = body(conn)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return result

    # ---- interface ------------------------------------------------------------------------

    async def start(self) -> None:
        try:
            await self._run(self._open)
        except (StoreUnavailable, OSError, sqlite3.Error) as exc:
            raise StoreUnavailable(f"cannot open job_store {self.url}: {exc}") from exc

    async def close(self) -> None:
        def _close() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await self._run(_close)
        self._executor.shutdown(wait=False)

    async def create(self, request: dict[str, Any], plan: dict[str, Any], key_id: str,
                     warnings: list[str] | None = None) -> Job:
        now = time.time()
        job = Job(id=new_job_id(), state=QUEUED, request=request, plan=plan, key_id=key_id, stage=QUEUED,
                  created_at=now, updated_at=now, warnings=list(warnings or []))
        values = [json.dumps(getattr(job, c)) if c in _JSON else getattr(job, c) for c in _COLUMNS]

        def _insert() -> None:
            self._db().execute(f"INSERT INTO jobs ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
                               values)

        await self._run(_insert)
        return job

    async def get(self, job_id: str) -> Job | None:
        def _get() -> Job | None:
            row = self._db().execute(f"{_SELECT} WHERE id = ?", (job_id,)).fetchone()
            return _to_job(row) if row else None

        return await self._run(_get)

    async def list(self, key_id: str, limit: int = 20, after: str | None = None) -> list[Job]:
        def _list() -> list[Job]:
            if after is None:
                rows = self._db().execute(f"{_SELECT} WHERE key_id = ? ORDER BY created_at DESC, id DESC LIMIT ?",
                                          (key_id, limit)).fetchall()
            else:
                rows = self._db().execute(
                    f"{_SELECT} WHERE key_id = ? AND (created_at, id) < "
                    "(SELECT created_at, id FROM jobs WHERE id = ?) ORDER BY created_at DESC, id DESC LIMIT ?",
                    (key_id, after, limit)).fetchall()
            return [_to_job(r) for r in rows]

        return await self._run(_list)

    async def update(self, job_id: str, owner: str, **fields: Any) -> bool:
        unknown = set(fields) - PROGRESS_FIELDS
        if unknown:
            raise ValueError(f"not progress fields: {sorted(unknown)}")
        values = [json.dumps(v) if k in _JSON else v for k, v in fields.items()]

        def _update() -> bool:
            cur = self._db().execute(
                f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in fields)}, updated_at = ? "
                "WHERE id = ? AND owner = ? AND state = ?", (*values, time.time(), job_id, owner, RUNNING))
            return cur.rowcount == 1

        return await self._run(_update)

    async def claim(self, owner: str, limit: int = 1) -> list[Job]:
        if limit <= 0:
            return []

        def _claim() -> list[Job]:
            now = time.time()
            # One statement: atomic against every other connection to the file.
            rows = self._db().execute(
                "UPDATE jobs SET state = ?, owner = ?, heartbeat_at = ?, updated_at = ?, attempts = attempts + 1 "
                "WHERE id IN (SELECT id FROM jobs WHERE state = ? AND cancel_requested = 0 "
                f"ORDER BY created_at LIMIT ?) RETURNING {', '.join(_COLUMNS)}",
                (RUNNING, owner, now, now, QUEUED, limit)).fetchall()
            return sorted((_to_job(r) for r in rows), key=lambda j: j.created_at)

        return await self._run(_claim)

    async def finish(self, job_id: str, owner: str, state: str, *, error: str | None = None,
                     timings: dict[str, float] | None = None, artifact: str | None = None,
                     quality: dict[str, float] | None = None) -> bool:
        if state not in FINAL_STATES:
            raise ValueError(f"not a final state: {state!r}")

        def _finish() -> bool:
            cur = self._db().execute(
                "UPDATE jobs SET state = ?, stage = NULL, error = ?, timings = COALESCE(?, timings), "
                "quality = COALESCE(?, quality), artifact = ?, updated_at = ? "
                "WHERE id = ? AND owner = ? AND state = ?",
                (state, error, json.dumps(timings) if timings is not None else None,
                 json.dumps(quality) if quality is not None else None, artifact, time.time(),
                 job_id, owner, RUNNING))
            return cur.rowcount == 1

        return await self._run(_finish)

    async def heartbeat(self, owner: str, job_ids: list[str]) -> set[str]:
        if not job_ids:
            return set()

        def _beat() -> set[str]:
            marks = ", ".join("?" * len(job_ids))
            rows = self._db().execute(
                f"UPDATE jobs SET heartbeat_at = ? WHERE owner = ? AND state = ? AND id IN ({marks}) RETURNING id",
                (time.time(), owner, RUNNING, *job_ids)).fetchall()
            return {r[0] for r in rows}

        return await self._run(_beat)

    async def recover_stale(self, stale_after_s: float, max_attempts: int) -> tuple[list[str], list[str]]:
        def _recover(conn: sqlite3.Connection) -> tuple[list[str], list[str]]:
            now = time.time()
            cutoff = now - stale_after_s
            failed = conn.execute(
                "UPDATE jobs SET state = ?, stage = NULL, error = ?, updated_at = ? "
                "WHERE state = ? AND heartbeat_at < ? AND attempts >= ? RETURNING id",
                (FAILED, OUT_OF_ATTEMPTS_ERROR, now, RUNNING, cutoff, max_attempts)).fetchall()
            requeued = conn.execute(
                "UPDATE jobs SET state = ?, stage = ?, owner = NULL, progress = '{}', error = ?, updated_at = ? "
                "WHERE state = ? AND heartbeat_at < ? RETURNING id",
                (QUEUED, QUEUED, RECOVERED_ERROR, now, RUNNING, cutoff)).fetchall()
            return [r[0] for r in requeued], [r[0] for r in failed]

        return await self._run(self._transaction, _recover)

    async def cancel(self, job_id: str) -> Job | None:
        def _cancel() -> Job | None:
            # One statement: a queued job is cancelled at once; a running one is flagged for
            # its owner, which stops at the next step boundary.
            self._db().execute(
                "UPDATE jobs SET cancel_requested = 1, updated_at = ?, "
                "state = CASE WHEN state = ? THEN ? ELSE state END, "
                "stage = CASE WHEN state = ? THEN NULL ELSE stage END, "
                "error = CASE WHEN state = ? THEN 'cancelled by the client' ELSE error END "
                "WHERE id = ? AND state IN (?, ?)",
                (time.time(), QUEUED, CANCELLED, QUEUED, QUEUED, job_id, QUEUED, RUNNING))
            row = self._db().execute(f"{_SELECT} WHERE id = ?", (job_id,)).fetchone()
            return _to_job(row) if row else None

        return await self._run(_cancel)

    async def cancel_requested(self, job_ids: list[str]) -> set[str]:
        if not job_ids:
            return set()

        def _flags() -> set[str]:
            marks = ", ".join("?" * len(job_ids))
            rows = self._db().execute(f"SELECT id FROM jobs WHERE cancel_requested = 1 AND id IN ({marks})",
                                      job_ids).fetchall()
            return {r[0] for r in rows}

        return await self._run(_flags)

    async def delete(self, job_id: str) -> bool:
        def _delete() -> bool:
            cur = self._db().execute(f"DELETE FROM jobs WHERE id = ? AND state IN ({', '.join('?' * len(FINAL_STATES))})",
                                     (job_id, *FINAL_STATES))
            return cur.rowcount == 1

        return await self._run(_delete)

    async def counts(self) -> dict[str, int]:
        def _counts() -> dict[str, int]:
            rows = self._db().execute("SELECT state, COUNT(*) FROM jobs WHERE state IN (?, ?) GROUP BY state",
                                      (QUEUED, RUNNING)).fetchall()
            return {QUEUED: 0, RUNNING: 0, **{state: n for state, n in rows}}

        return await self._run(_counts)
