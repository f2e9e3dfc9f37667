"""Fake deployment handles for testing the orchestrator, the job runner and the HTTP layer
without Ray: `handle.method.remote(...)` calls a coroutine (or async generator) function."""

from __future__ import annotations

from types import SimpleNamespace

from vidgen_serve.serving.orchestrator import GenerationOrchestrator


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
    return [(args[0], args[4]) for name, args in calls if name == "record"]


def make_stages(calls, *, denoise=None, standby_denoise=None, route="primary", decode_to_store=None):
    """An orchestrator over fake stages: 2 denoising steps, MP4 bytes b"MP4LATENTS"."""
    async def encode(plan, carrier):
        return SimpleNamespace(cache_misses=1), {"text_encode": 0.01}

    async def default_denoise(plan, embeddings, carrier):
        for step in (1, 2):
            yield {"progress": {"step": step, "steps": 2, "window": 1, "windows": 1}}
        yield {"latents": "LATENTS", "timings": {"denoise": 0.02}}

    async def decode(plan, latents, carrier):
        return b"MP4" + latents.encode(), {"vae_decode": 0.01, "encode": 0.01}

    async def default_store(plan, latents, key, carrier):
        return {"vae_decode": 0.01, "encode": 0.01, "store": 0.001}

    async def choose():
        return route

    async def record(target, seconds, steps, tokens, ok):
        return None

    text = FakeHandle(calls, encode=encode)
    denoisers = {"primary": FakeHandle(calls, denoise=denoise or default_denoise),
                 "standby": FakeHandle(calls, denoise=standby_denoise or default_denoise)}
    decoder = FakeHandle(calls, decode=decode, decode_to_store=decode_to_store or default_store)
    router = FakeHandle(calls, choose=choose, record=record)
    return GenerationOrchestrator(text, denoisers, decoder, router)
