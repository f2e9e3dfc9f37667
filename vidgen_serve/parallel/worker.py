"""One rank of the denoiser's worker group (a Ray actor in serving; a plain class here).

See ``DESIGN.md`` -> "Tensor-parallel denoiser" and docs/parallel.md.  :class:`ParallelWorker`
joins the group's ``torch.distributed`` process group, splits it by the profile's layout, loads
its part of the transformer and runs the same denoising calls as every other rank.
"""

from __future__ import annotations

import logging

from collections import OrderedDict
from typing import Any

import torch

from ..config import AppConfig
from ..plan import GenerationPlan

__all__ = ["ParallelWorker", "TensorParallelWorker"]

logger = logging.getLogger(__name__)


class ParallelWorker:
    """One rank of a parallel denoiser: this rank's part of the transformer wrapped in a ``Denoiser``.

    A plain class: :class:`~.group.ParallelDenoiser` wraps it with ``ray.remote``.  Construction
    is cheap; :meth:`setup` joins the process group, splits it by the profile's layout
    ``{tp, ulysses, cfg}``, and loads only this rank's part of the checkpoint's transformer onto
    its device (:func:`~.transformer.load_parallel_transformer`).  Passing
    ``master_addr``/``master_port`` to the constructor calls :meth:`setup` right away.

    Every rank must see the same calls in the same order (the forward communicates); all ranks
    end each step with the same latents, rank 0 returns them, the others return None.
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        config: AppConfig,
        checkpoint: str | None = None,
        master_addr: str | None = None,
        master_port: int | None = None,
        max_runs: int = 8,
        max_styles: int | None = None,
    ):
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.config = config
        self.profile = config.model_profile
        self.checkpoint = checkpoint
        self.max_runs = max_runs
        self.max_styles = max_styles  # style LoRA adapters kept loaded on this rank (None: the default)
        self.denoiser = None
        self.device: torch.device | None = None
        self.backend: str | None = None
        self.groups = None
        self._runs: OrderedDict[Any, Any] = OrderedDict()
        self._store = None  # rank 0's rendezvous store, from `rendezvous` until the group forms
        if master_addr is not None and master_port is not None:
            self.setup(master_addr, master_port)

    # -- group formation ---------------------------------------------------------------------

    def rendezvous(self, timeout_s: float = 600.0) -> tuple[str, int]:
        """(node IP, port) of the group's rendezvous store, which this rank (rank 0) starts listening on.

        The store holds its port from now until :meth:`setup`, so nothing else on the node can
        take it in between.
        """
        from .process_group import listen_store

        try:
            import ray

            ip = ray.util.get_node_ip_address()
        except Exception:  # noqa: BLE001 - outside Ray
            ip = "127.0.0.1"
        if self._store is None:
            self._store = listen_store(ip, self.world_size, timeout_s)
        return ip, int(self._store.port)

    def setup(self, master_addr: str, master_port: int, timeout_s: float = 600.0) -> dict:
        """Join the group, load this rank's part of the transformer, build its ``Denoiser``."""
        from ..models.loading import resolve_checkpoint
        from ..pipeline.denoiser import Denoiser
        from .process_group import build_parallel_groups, init_process_group, join_store, listen_store
        from .transformer import load_parallel_transformer

        if self.denoiser is not None:
            return self.info()
        profile = self.profile
        on_gpu = profile.device == "cuda"
        if on_gpu:
            if not torch.cuda.is_available():
                raise RuntimeError(f"parallel rank {self.rank}: profile {profile.name} needs CUDA, none visible")
            # Ray exposes exactly the actor's GPU (CUDA_VISIBLE_DEVICES), so it is cuda:0 there.
            count = torch.cuda.device_count()
            local_rank = 0 if count == 1 else self.rank % count
            backend = "nccl"
        else:
            local_rank = self.rank
            backend = "gloo"
        # Rank 0 listens (on the store it opened in `rendezvous`, or on the given port); the others join it.
        import torch.distributed as dist

        if dist.is_initialized():  # this process already belongs to a group (e.g. a test's rank pool)
            store = None
        elif self.rank == 0:
            store = self._store or listen_store(master_addr, self.world_size, timeout_s, port=int(master_port))
        else:
            store = join_store(master_addr, int(master_port), self.world_size, timeout_s)
        self.backend = init_process_group(
            self.rank, self.world_size, master_addr, int(master_port), backend=backend,
            local_rank=local_rank, timeout_s=timeout_s, store=store,
        )
        self._store = None  # the process group holds it now
        self.groups = build_parallel_groups(profile.parallel)
        checkpoint = self.checkpoint or resolve_checkpoint(self.config)
        self.checkpoint = checkpoint
        self.device = torch.device("cuda", local_rank) if on_gpu else torch.device("cpu")
        transformer = load_parallel_transformer(checkpoint, profile, self.groups, self.device)
        kwargs = {} if self.max_styles is None else {"max_styles": self.max_styles}
        self.denoiser = Denoiser(self.config, checkpoint, transformer=transformer, device=self.device, **kwargs)
        return self.info()

    def info(self) -> dict:
        groups = self.groups
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "coords": None if groups is None else {"tp": groups.tp_rank, "ulysses": groups.ulysses_rank,
                                                   "cfg": groups.cfg_rank},
            "backend": self.backend,
            "device": str(self.device),
            "ready": self.denoiser is not None,
            "parameter_bytes": self.parameter_bytes() if self.denoiser is not None else None,
        }

    # -- denoising -----------------------------------------------------------------------------

    def _require(self):
        if self.denoiser is None:
            raise RuntimeError(f"parallel rank {self.rank} is not set up")
        return self.denoiser

    def start(self, plan: GenerationPlan, embeddings, run_id: Any = None) -> dict:
        """Create a ``DenoiseRun`` (kept under ``run_id``); returns its {"steps", "windows"}.

        A style whose adapter can't be loaded returns {"error": StyleUnavailable} instead of
        raising: the group stays healthy (a raising rank marks it broken) and serves other styles.
        """
        from ..pipeline.styles import StyleUnavailable

        try:
            run = self._require().start(plan, embeddings)
        except StyleUnavailable as exc:
            return {"error": exc}
        self._runs[run_id] = run
        self._runs.move_to_end(run_id)
        while len(self._runs) > self.max_runs:  # abandoned runs (cancelled without release)
            self._runs.popitem(last=False)
        return {"steps": len(run.timesteps), "windows": len(plan.windows)}

    def _run(self, run_id: Any):
        try:
            return self._runs[run_id]
        except KeyError:
            raise RuntimeError(f"parallel rank {self.rank}: no run {run_id!r} (not started or released)") from None

    def advance(self, run_id: Any = None) -> dict[str, int]:
        """One (step, window) unit of the run, on this rank's shard; the progress dict."""
        return self._run(run_id).advance()

    def latents(self, run_id: Any = None, release: bool = True) -> torch.Tensor | None:
        """The run's final latents (float32, CPU) on rank 0; None on the others."""
        run = self._run(run_id)
        out = run.latents() if self.rank == 0 else None
        if release:
            self._runs.pop(run_id, None)
        return out

    def release(self, run_id: Any = None) -> None:
        self._runs.pop(run_id, None)

    # -- style LoRA adapters (the same calls on every rank, so every rank holds the same adapters) --

    def load_style(self, style: str) -> dict:
        """Load ``style``'s adapter into this rank's part of the transformer: {"loaded": read now} or
        {"error": StyleUnavailable} (returned, not raised: see :meth:`start`)."""
        from ..pipeline.styles import StyleUnavailable

        try:
            return {"loaded": self._require().load_style(style)}
        except StyleUnavailable as exc:
            return {"error": exc}

    def unload_style(self, style: str) -> bool:
        return self._require().unload_style(style)

    def style_stats(self) -> dict:
        return self._require().style_stats()

    # -- introspection / lifecycle -------------------------------------------------------------

    def parameter_bytes(self) -> int:
        """Bytes of the transformer parameters this rank holds."""
        from .tensor_parallel import parameter_bytes

        return parameter_bytes(self._require().transformer)

    def ping(self) -> dict:
        """Liveness; the front calls it in the "health" concurrency group, so it answers while a step runs."""
        return {"rank": self.rank, "ready": self.denoiser is not None}

    def shutdown(self) -> None:
        """Drop the runs and the model and leave the process group."""
        import torch.distributed as dist

        self._runs.clear()
        self.denoiser = None
        try:
            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
        except Exception as exc:  # noqa: BLE001 - best effort; the actor is killed next anyway
            logger.debug("rank %d: leaving the process group failed: %r", self.rank, exc)


#: The name from before the group carried Ulysses and CFG layouts.
TensorParallelWorker = ParallelWorker
