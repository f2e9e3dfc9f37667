"""Fake deployment handles for testing the orchestrator, the job runner and the HTTP layer
without Ray: `handle.method.remote(...)` calls a coroutine (or async generator) function."""

from __future__ import annotations

import contextlib
import tempfile
from types import SimpleNamespace

import httpx

from vidgen_serve.serving.orchestrator import GenerationOrchestrator

VIDEO = b"\x00\x00\x00\x18ftypisom" + bytes(range(256)) * 8  # what the fake decoder stores
QUALITY = {"temporal_ssim": 0.9312, "temporal_psnr_db": 27.41, "flicker": 0.982}  # the fake decoder's metrics


class _Stream:
    """What `handle.options(stream=True).method.remote()` returns: an async iterator with cancel()."""

    def __init__(self, agen):
        self._agen = agen
        self.cancelled = False

    def __aiter__(self):
        return self._agen.__aiter__()

    def cancel(self):
        self.cancelled = True


class _Method:
    def __init__(self, fn, calls, name, stream=False):
        self.fn, self.calls, self.name, self.stream = fn, calls, name, stream

    def remote(self, *args):
        self.calls.append((self.name, args))
        out = self.fn(*args)
        if self.stream:
            out = _Stream(out)
            self.calls.append(("stream", out))
        return out


class FakeHandle:
    """A deployment handle: `handle.method.remote(...)` awaits the given coroutine function."""

    def __init__(self, calls: list, stream: bool = False, **methods):
        self._calls, self._methods, self._stream = calls, methods, stream

    def options(self, stream: bool = False):
        return FakeHandle(self._calls, stream, **self._methods)

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return _Method(self._methods[name], self._calls, name, self._stream)


def records(calls) -> list[tuple[str, bool]]:
    """(target, ok) of each report to the failover router."""
    return [(args[0], args[3]) for name, args in calls if name == "record"]


def decoder_stream(fn, store: bool):
    """The Decoder's streamed call from a coroutine function returning what the stage returns
    (`(mp4, timings)` for decode, `timings` for decode_to_store): one progress event per
    phase first, as the real Decoder sends them, and QUALITY as the video's metrics."""

    async def stream(*args):
        *call, progress = args if len(args) == (5 if store else 4) else (*args, True)
        if progress:
            yield {"progress": {"phase": "vae_decode", "fraction": 1.0}}
            yield {"progress": {"phase": "encode", "fraction": 1.0}}
        if store:
            yield {"timings": await fn(*call), "quality": dict(QUALITY)}
        else:
            mp4, timings = await fn(*call)
            yield {"mp4": mp4, "timings": timings, "quality": dict(QUALITY)}

    return stream


def make_stages(calls, *, denoise=None, standby_denoise=None, route="primary", decode=None, decode_to_store=None,
                count_tokens=None):
    """An orchestrator over fake stages: 2 denoising steps, MP4 bytes b"MP4LATENTS"."""
    async def encode(plan, carrier):
        return SimpleNamespace(cache_misses=1), {"text_encode": 0.01}

    async def default_denoise(plan, embeddings, carrier, progress=True):
        for step in (1, 2):
            if progress:
                yield {"progress": {"step": step, "steps": 2, "window": 1, "windows": 1}}
        yield {"latents": "LATENTS", "timings": {"denoise": 0.02}}

    async def default_decode(plan, latents, carrier):
        return b"MP4" + latents.encode(), {"vae_decode": 0.01, "encode": 0.01}

    async def default_store(plan, latents, key, carrier):
        return {"vae_decode": 0.01, "encode": 0.01, "store": 0.001}

    async def choose():
        return route

    async def record(target, seconds, work_units, ok):
        return None

    text = FakeHandle(calls, encode=encode, **({"count_tokens": count_tokens} if count_tokens else {}))
    denoisers = {"primary": FakeHandle(calls, denoise=denoise or default_denoise),
                 "standby": FakeHandle(calls, denoise=standby_denoise or default_denoise)}
    decoder = FakeHandle(calls, decode=decoder_stream(decode or default_decode, store=False),
                         decode_to_store=decoder_stream(decode_to_store or default_store, store=True))
    router = FakeHandle(calls, choose=choose, record=record)
    return GenerationOrchestrator(text, denoisers, decoder, router)


def storing_decoder(store, before=None):
    """A fake `decode_to_store` that writes VIDEO to `store` (after awaiting `before()`, if given)."""

    async def decode_to_store(plan, latents, key, carrier):
        if before is not None:
            await before()
        with tempfile.NamedTemporaryFile(suffix=".mp4") as f:
            f.write(VIDEO)
            f.flush()
            await store.put_file(key, f.name)
        return {"vae_decode": 0.01, "encode": 0.01, "store": 0.01}

    return decode_to_store


@contextlib.asynccontextmanager
async def ingress_app(settings, *, denoise=None, decode=None, before_store=None, count_tokens=None):
    """A real `Ingress` (app, routes, job runner, stores) over fake stages; yields (client, ingress).

    The fake decoder writes VIDEO to the configured artifact store, after `before_store()`;
    `count_tokens(texts)` (a coroutine function) answers the text encoder's token counts.
    """
    from vidgen_serve.serving.ingress import Ingress

    store = settings.open_artifact_store()
    await store.start()
    orch = make_stages([], denoise=denoise, decode=decode, decode_to_store=storing_decoder(store, before_store),
                       count_tokens=count_tokens)
    ingress = object.__new__(Ingress)  # its constructor is async (Serve awaits it)
    await ingress.__init__(settings, orch.text_encoder, orch.denoisers, orch.decoder, orch.router)
    app = ingress.__serve_build_asgi_app__()
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
    try:
        yield client, ingress
    finally:
        await client.aclose()
        await ingress.shutdown()
