"""Style LoRA adapters through Ray Serve model multiplexing (one denoiser replica's side).

The orchestrator calls the denoiser with ``.options(multiplexed_model_id=<style>)`` for a style
that carries a LoRA adapter, so Serve routes the style's requests to replicas that already hold
it. In the replica, `StyleMultiplexer.ensure()` reads ``serve.get_multiplexed_model_id()`` and
asks Serve's ``@serve.multiplexed`` cache for the style: a miss runs the loader (the adapter is
read into the transformer on the replica's denoise thread, counted), and when the replica holds
``max_styles_per_replica`` adapters Serve evicts the least recently used, calling the cached
object's ``__del__``: `StyleAdapterHandle` unloads its adapter from the transformer then.

The limit is a serving setting, so the multiplexed loader is built per replica
(``serve.multiplexed(max_num_models_per_replica=...)`` applied to a closure) rather than by a
decorator fixed at import time.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor
from typing import Any

logger = logging.getLogger("vidgen_serve.styles")

_WRAPPER_ATTR = "__serve_multiplex_wrapper"  # where Serve caches its per-replica multiplexer


class StyleAdapterHandle:
    """What Serve's multiplexed cache holds per style; its teardown unloads the adapter.

    The unload is queued on the replica's denoise thread (runs are never interrupted mid-unit)
    and not waited for; idempotent, since Serve calls ``__del__`` on eviction and Python calls it
    again when the object is collected.
    """

    def __init__(self, style: str, stage: Any, executor: Executor):
        self.style = style
        self._stage: Any = stage
        self._executor: Executor | None = executor

    def __del__(self) -> None:
        executor, self._executor = getattr(self, "_executor", None), None
        if executor is None:
            return
        try:
            executor.submit(self._stage.unload_style, self.style)
            logger.info("style %r evicted from this replica", self.style)
        except Exception:  # noqa: BLE001 - replica shutting down: the transformer goes with it
            pass


class StyleMultiplexer:
    """A denoiser replica's multiplexed style adapters (see the module docstring).

    Args:
        stage: the replica's `Denoiser` or `ParallelDenoiser` (`load_style`, `unload_style`).
        executor: the replica's single denoise thread: loads and unloads run between denoise units.
        max_styles: `max_styles_per_replica`.
        role: the denoiser's role (metric tag).
    """

    def __init__(self, stage: Any, executor: Executor, max_styles: int, role: str = "primary"):
        self.stage = stage
        self.executor = executor
        self.max_styles = int(max_styles)
        self.role = role
        self.requests: dict[str, int] = {}  # multiplexed model ids received, per style
        self.loads = 0  # adapters read into the transformer through the multiplexed loader
        self._loader: Any = None
        self._metric: Any = None

    def _loads_metric(self) -> Any:
        if self._metric is None:
            from ray.serve import metrics

            self._metric = metrics.Counter(
                "vidgen_style_adapter_loads", description="Style LoRA adapters read into a denoiser replica.",
                tag_keys=("style", "role"))
        return self._metric

    def _multiplexed(self) -> Any:
        if self._loader is None:
            from ray import serve

            async def load_style_adapter(style: str) -> StyleAdapterHandle:
                loop = asyncio.get_running_loop()
                loaded = await loop.run_in_executor(self.executor, self.stage.load_style, style)
                if loaded:
                    self.loads += 1
                    self._loads_metric().inc(tags={"style": style, "role": self.role})
                return StyleAdapterHandle(style, self.stage, self.executor)

            self._loader = serve.multiplexed(max_num_models_per_replica=self.max_styles)(load_style_adapter)
        return self._loader

    async def ensure(self) -> str | None:
        """Load (or touch, LRU) the style this request was routed for; its name, or None for a plain call."""
        from ray import serve

        try:
            style = serve.get_multiplexed_model_id()
        except Exception:  # noqa: BLE001 - outside a Serve request (direct construction in tests)
            style = ""
        if not style:
            return None
        self.requests[style] = self.requests.get(style, 0) + 1
        await self._multiplexed()(style)
        return style

    def held(self) -> list[str]:
        """Styles Serve's multiplexed cache holds on this replica (least recently used first)."""
        # Serve keeps its multiplexer on the decorated function (`__wrapped__` of what it returned).
        function = getattr(self._loader, "__wrapped__", self._loader)
        wrapper = getattr(function, _WRAPPER_ATTR, None) if function is not None else None
        return list(wrapper.models) if wrapper is not None else []

    def stats(self) -> dict[str, Any]:
        return {"multiplexed": self.held(), "requests": dict(self.requests), "multiplexed_loads": self.loads,
                "max_styles_per_replica": self.max_styles}
