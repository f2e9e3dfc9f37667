"""Redis job store: the cluster backend (`job_store: redis://host:port/db`), redis-py asyncio.

Layout (every key under one hash tag, so a Redis Cluster keeps them in one slot):
  `{ns}:job:<id>`    hash: the job's fields (scalars as strings, dicts as JSON)
  `{ns}:queued`      sorted set: queued job ids by creation time (the queue)
  `{ns}:running`     sorted set: running job ids by last heartbeat (server time)
  `{ns}:key:<key>`   sorted set: a key's job ids by creation time (listing)

Every state transition is one Lua script, so it is atomic across replicas: two replicas
never claim the same job, and a stale job is recovered by exactly one of them. Time in the
scripts is Redis's own clock (`TIME`), so replicas' clock skew cannot make a live job look
stale. Connection failures surface as `StoreUnavailable` (503 + Retry-After), and the
client reconnects by itself when Redis is back.
"""

from __future__ import annotations

import functools
import json
import time
from typing import Any, Awaitable, Callable, TypeVar

from .jobs import (FINAL_STATES, OUT_OF_ATTEMPTS_ERROR, PROGRESS_FIELDS, QUEUED, RECOVERED_ERROR, RUNNING, Job,
                   JobStore, StoreUnavailable, new_job_id, redact)

T = TypeVar("T")

_JSON = ("request", "plan", "progress", "timings", "warnings", "quality")
_FLOAT = ("created_at", "updated_at", "heartbeat_at")

# KEYS: queued, running. ARGV: prefix, owner, limit.
_CLAIM = """
local t = redis.call('TIME'); local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local out = {}
local limit = tonumber(ARGV[3])
while #out < limit do
  local head = redis.call('ZRANGE', KEYS[1], 0, 0)
  if #head == 0 then break end
  local id = head[1]
  redis.call('ZREM', KEYS[1], id)
  local key = ARGV[1] .. 'job:' .. id
  if redis.call('HGET', key, 'state') == 'queued' and redis.call('HGET', key, 'cancel_requested') ~= '1' then
    redis.call('HSET', key, 'state', 'running', 'owner', ARGV[2], 'heartbeat_at', now, 'updated_at', now)
    redis.call('HINCRBY', key, 'attempts', 1)
    redis.call('ZADD', KEYS[2], now, id)
    table.insert(out, id)
  end
end
return out
"""

# KEYS: running. ARGV: prefix, owner, id... Returns the ids the owner still holds.
_HEARTBEAT = """
local t = redis.call('TIME'); local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local out = {}
for i = 3, #ARGV do
  local key = ARGV[1] .. 'job:' .. ARGV[i]
  if redis.call('HGET', key, 'state') == 'running' and redis.call('HGET', key, 'owner') == ARGV[2] then
    redis.call('HSET', key, 'heartbeat_at', now)
    redis.call('ZADD', KEYS[1], 'XX', now, ARGV[i])
    table.insert(out, ARGV[i])
  end
end
return out
"""

# KEYS: queued, running. ARGV: prefix, stale_after_s, max_attempts, recovered error, failed error.
_RECOVER = """
local t = redis.call('TIME'); local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local stale = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[2]))
local requeued, failed = {}, {}
for _, id in ipairs(stale) do
  redis.call('ZREM', KEYS[2], id)
  local key = ARGV[1] .. 'job:' .. id
  if redis.call('HGET', key, 'state') == 'running' then
    if tonumber(redis.call('HGET', key, 'attempts') or '0') >= tonumber(ARGV[3]) then
      redis.call('HSET', key, 'state', 'failed', 'error', ARGV[5], 'updated_at', now)
      redis.call('HDEL', key, 'stage')
      table.insert(failed, id)
    else
      redis.call('HSET', key, 'state', 'queued', 'stage', 'queued', 'progress', '{}', 'error', ARGV[4],
                 'updated_at', now)
      redis.call('HDEL', key, 'owner')
      redis.call('ZADD', KEYS[1], tonumber(redis.call('HGET', key, 'created_at')), id)
      table.insert(requeued, id)
    end
  end
end
return {requeued, failed}
"""

# KEYS: job, running. ARGV: owner, id, state, then field/value pairs to set, '--', fields to delete.
_FINISH = """
if redis.call('HGET', KEYS[1], 'state') ~= 'running' or redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then
  return 0
end
local t = redis.call('TIME'); local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('HSET', KEYS[1], 'state', ARGV[3], 'updated_at', now)
local i = 4
while ARGV[i] ~= '--' do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]); i = i + 2 end
for j = i + 1, #ARGV do redis.call('HDEL', KEYS[1], ARGV[j]) end
redis.call('ZREM', KEYS[2], ARGV[2])
return 1
"""

# KEYS: job. ARGV: owner, field/value pairs, '--', fields to delete.
_UPDATE = """
if redis.call('HGET', KEYS[1], 'state') ~= 'running' or redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then
  return 0
end
local t = redis.call('TIME'); local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('HSET', KEYS[1], 'updated_at', now)
local i = 2
while ARGV[i] ~= '--' do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]); i = i + 2 end
for j = i + 1, #ARGV do redis.call('HDEL', KEYS[1], ARGV[j]) end
return 1
"""

# KEYS: job, queued. ARGV: id. A queued job is cancelled now; a running one is flagged.
_CANCEL = """
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'queued' then
  local t = redis.call('TIME'); local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
  redis.call('HSET', KEYS[1], 'state', 'cancelled', 'cancel_requested', '1', 'error', 'cancelled by the client',
             'updated_at', now)
  redis.call('HDEL', KEYS[1], 'stage')
  redis.call('ZREM', KEYS[2], ARGV[1])
elseif state == 'running' then
  redis.call('HSET', KEYS[1], 'cancel_requested', '1')
end
return state
"""

# KEYS: job, key index. ARGV: id. Only a job in a final state is removed.
_DELETE = """
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'succeeded' and state ~= 'failed' and state ~= 'cancelled' then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""


def _encode(name: str, value: Any) -> str:
    if name in _JSON:
        return json.dumps(value)
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def _pairs(fields: dict[str, Any]) -> list[str]:
    """Field/value pairs to set, '--', then the fields to delete (those set to None)."""
    out = []
    for name, value in fields.items():
        if value is not None:
            out += [name, _encode(name, value)]
    return out + ["--"] + [name for name, value in fields.items() if value is None]


def _decode(data: dict[str, str]) -> Job:
    kw: dict[str, Any] = dict(data)
    for name in _JSON:
        kw[name] = json.loads(data.get(name, "[]" if name == "warnings" else "{}"))
    for name in _FLOAT:
        if name in data:
            kw[name] = float(data[name])
    kw["attempts"] = int(data.get("attempts", 0))
    kw["cancel_requested"] = data.get("cancel_requested") == "1"
    return Job(**kw)


def _guard(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Redis connection failures as `StoreUnavailable` (503 + Retry-After)."""

    @functools.wraps(method)
    async def wrapper(self: "RedisJobStore", *args: Any, **kwargs: Any) -> T:
        from redis.exceptions import BusyLoadingError, ConnectionError, TimeoutError

        try:
            return await method(self, *args, **kwargs)
        except (ConnectionError, TimeoutError, BusyLoadingError, OSError) as exc:
            raise StoreUnavailable(f"{self.url}: {type(exc).__name__}") from exc

    return wrapper


class RedisJobStore(JobStore):
    """Job records in Redis.

    Args:
        url: `redis://[user:password@]host:port/db` or `rediss://...` (TLS).
        namespace: key prefix (one application's jobs; tests use their own).
        connect_timeout_s: socket connect/read timeout: a dead Redis answers a request with
            503 in about this long instead of hanging it.
    """

    def __init__(self, url: str, namespace: str = "vidgen", connect_timeout_s: float = 2.0):
        self.url = redact(url)
        self._raw_url = url
        self.prefix = f"{{{namespace}}}:"
        self._queued = self.prefix + "queued"
        self._running = self.prefix + "running"
        self._timeout = connect_timeout_s
        self._redis: Any = None
        self._scripts: dict[str, Any] = {}

    def _job_key(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    def _key_index(self, key_id: str) -> str:
        return f"{self.prefix}key:{key_id}"

    async def start(self) -> None:
        from redis.asyncio import Redis
        from redis.backoff import ExponentialBackoff
        from redis.exceptions import RedisError
        from redis.retry import Retry

        try:
            self._redis = Redis.from_url(
                self._raw_url, decode_responses=True, socket_connect_timeout=self._timeout,
                socket_timeout=self._timeout, health_check_interval=10,
                retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2),
            )
            await self._redis.ping()
        except (RedisError, OSError, ValueError) as exc:
            raise StoreUnavailable(f"cannot reach job_store {self.url}: {exc}") from exc
        for name, source in (("claim", _CLAIM), ("heartbeat", _HEARTBEAT), ("recover", _RECOVER),
                             ("finish", _FINISH), ("update", _UPDATE), ("cancel", _CANCEL),
                             ("delete", _DELETE)):
            # register_script runs EVALSHA and reloads the script itself after a Redis restart.
            self._scripts[name] = self._redis.register_script(source)

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    @_guard
    async def create(self, request: dict[str, Any], plan: dict[str, Any], key_id: str,
                     warnings: list[str] | None = None) -> Job:
        now = time.time()
        job = Job(id=new_job_id(), state=QUEUED, request=request, plan=plan, key_id=key_id, stage=QUEUED,
                  created_at=now, updated_at=now, warnings=list(warnings or []))
        fields = {name: _encode(name, value) for name, value in vars(job).items() if value is not None}
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._job_key(job.id), mapping=fields)
            pipe.zadd(self._key_index(key_id), {job.id: now})
            pipe.zadd(self._queued, {job.id: now})
            await pipe.execute()
        return job

    @_guard
    async def get(self, job_id: str) -> Job | None:
        data = await self._redis.hgetall(self._job_key(job_id))
        return _decode(data) if data else None

    async def _get_many(self, ids: list[str]) -> list[Job]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hgetall(self._job_key(job_id))
            rows = await pipe.execute()
        return [_decode(r) for r in rows if r]

    @_guard
    async def list(self, key_id: str, limit: int = 20, after: str | None = None) -> list[Job]:
        index = self._key_index(key_id)
        start = 0
        if after is not None:
            rank = await self._redis.zrevrank(index, after)
            if rank is None:
                return []
            start = rank + 1
        ids = await self._redis.zrevrange(index, start, start + limit - 1)
        return await self._get_many(ids)

    @_guard
    async def update(self, job_id: str, owner: str, **fields: Any) -> bool:
        unknown = set(fields) - PROGRESS_FIELDS
        if unknown:
            raise ValueError(f"not progress fields: {sorted(unknown)}")
        done = await self._scripts["update"](keys=[self._job_key(job_id)], args=[owner, *_pairs(fields)])
        return done == 1

    @_guard
    async def claim(self, owner: str, limit: int = 1) -> list[Job]:
        if limit <= 0:
            return []
        ids = await self._scripts["claim"](keys=[self._queued, self._running], args=[self.prefix, owner, limit])
        return await self._get_many(ids)

    @_guard
    async def finish(self, job_id: str, owner: str, state: str, *, error: str | None = None,
                     timings: dict[str, float] | None = None, artifact: str | None = None,
                     quality: dict[str, float] | None = None) -> bool:
        if state not in FINAL_STATES:
            raise ValueError(f"not a final state: {state!r}")
        fields: dict[str, Any] = {"error": error, "artifact": artifact, "stage": None}
        if timings is not None:
            fields["timings"] = timings
        if quality is not None:
            fields["quality"] = quality
        done = await self._scripts["finish"](keys=[self._job_key(job_id), self._running],
                                             args=[owner, job_id, state, *_pairs(fields)])
        return done == 1

    @_guard
    async def heartbeat(self, owner: str, job_ids: list[str]) -> set[str]:
        if not job_ids:
            return set()
        held = await self._scripts["heartbeat"](keys=[self._running], args=[self.prefix, owner, *job_ids])
        return set(held)

    @_guard
    async def recover_stale(self, stale_after_s: float, max_attempts: int) -> tuple[list[str], list[str]]:
        requeued, failed = await self._scripts["recover"](
            keys=[self._queued, self._running],
            args=[self.prefix, stale_after_s, max_attempts, RECOVERED_ERROR, OUT_OF_ATTEMPTS_ERROR])
        return list(requeued), list(failed)

    @_guard
    async def cancel(self, job_id: str) -> Job | None:
        await self._scripts["cancel"](keys=[self._job_key(job_id), self._queued], args=[job_id])
        return await self.get(job_id)

    @_guard
    async def cancel_requested(self, job_ids: list[str]) -> set[str]:
        if not job_ids:
            return set()
        async with self._redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hget(self._job_key(job_id), "cancel_requested")
            flags = await pipe.execute()
        return {job_id for job_id, flag in zip(job_ids, flags) if flag == "1"}

    @_guard
    async def delete(self, job_id: str) -> bool:
        job = await self.get(job_id)
        if job is None:
            return False
        done = await self._scripts["delete"](keys=[self._job_key(job_id), self._key_index(job.key_id)],
                                             args=[job_id])
        return done == 1

    @_guard
    async def counts(self) -> dict[str, int]:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.zcard(self._queued)
            pipe.zcard(self._running)
            queued, running = await pipe.execute()
        return {QUEUED: queued, RUNNING: running}

