"""A job-running ingress replica as its own process (for the SIGKILL test): the real job
runner and Redis job store over fake stages. Each denoise records its run in Redis and then
holds until the test sets the release key; the decoder stores bytes derived from the
plan's seed (the same seed gives the same "frames").

    python replica_process.py REDIS_URL NAMESPACE STATE_DIR OWNER MAX_RUNNING
"""

from __future__ import annotations

import asyncio
import sys
import tempfile

from fake_handles import make_stages


def frames_for(seed: int) -> bytes:
    return f"frames-of-seed-{seed}".encode() * 64


async def main(redis_url: str, namespace: str, state_dir: str, owner: str, max_running: int) -> None:
    import redis.asyncio as aioredis

    from vidgen_serve.serving.job_runner import JobRunner
    from vidgen_serve.serving.settings import ServeSettings

    settings = ServeSettings(state_dir=state_dir, job_store=redis_url, job_store_namespace=namespace,
                             max_running_jobs=max_running, job_heartbeat_s=0.2, job_stale_after_s=1.5,
                             max_job_attempts=2)
    control = aioredis.Redis.from_url(redis_url)
    prefix = f"{{{namespace}}}:test:"
    artifacts = settings.open_artifact_store()
    await artifacts.start()

    async def denoise(plan, embeddings, carrier, progress=True):
        for step in (1, 2):
            yield {"progress": {"step": step, "steps": 2, "window": 1, "windows": 1}}
        await control.rpush(prefix + "started", f"{owner}:{plan.seed}")
        while not await control.exists(prefix + "release"):
            await asyncio.sleep(0.05)
        yield {"latents": plan.seed, "timings": {"denoise": 0.1}}

    async def decode_to_store(plan, latents, key, carrier):
        with tempfile.NamedTemporaryFile(suffix=".mp4") as f:
            f.write(frames_for(latents))
            f.flush()
            await artifacts.put_file(key, f.name)
        await control.rpush(prefix + "stored", f"{owner}:{plan.seed}")
        return {"vae_decode": 0.01, "encode": 0.01, "store": 0.01}

    store = settings.open_job_store()
    await store.start()
    runner = JobRunner(store, make_stages([], denoise=denoise, decode_to_store=decode_to_store), settings,
                       owner=owner, poll_interval_s=0.05)
    runner.start()
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    url, ns, state, who, running = sys.argv[1:6]
    asyncio.run(main(url, ns, state, who, int(running)))
