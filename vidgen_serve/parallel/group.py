"""One Denoiser replica = a worker group of N Ray actors in a placement group (the front).

See ``DESIGN.md`` -> "Tensor-parallel denoiser" and docs/parallel.md.  The Serve Denoiser
replica owns a placement group (``STRICT_PACK``): bundle 0 for the replica itself, bundles 1..N
one per rank (one GPU each on GPU profiles, a CPU fraction on CPU), N = tp * ulysses * cfg of
the profile's ``parallel`` layout.  :class:`ParallelDenoiser` is what the replica holds instead
of a :class:`~vidgen_serve.pipeline.denoiser.Denoiser`: it starts N
:class:`~.worker.ParallelWorker` actors in bundles 1..N, they form a ``torch.distributed`` group
(NCCL on GPU, gloo on CPU) and lay the Wan transformer out over it; every step all ranks run
the same (step, window) unit and rank 0 returns the latents.

Outside Serve (CLI ``--parallel``, tests) there is no current placement group, so the front
creates one for the ranks and removes it in :meth:`ParallelDenoiser.close`.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from typing import Any, Sequence

import torch

from ..config import AppConfig, ModelProfile, ParallelLayout, check_parallel
from ..config import valid_tp_sizes as config_valid_tp_sizes
from ..pipeline.denoiser import drive
from ..plan import GenerationPlan
from .worker import ParallelWorker, TensorParallelWorker

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_CPUS_PER_RANK",
    "DEFAULT_REPLICA_CPUS",
    "ParallelDenoiser",
    "ParallelRun",
    "ParallelWorker",
    "TensorParallelDenoiser",
    "TensorParallelRun",
    "TensorParallelWorker",
    "placement_group_bundles",
    "valid_tp_sizes",
    "validate_layout",
    "validate_tp",
]

#: CPU fraction of one rank's bundle on CPU profiles (the CPU machine has 2 cores and many replicas).
DEFAULT_CPUS_PER_RANK = 0.25
#: CPUs of bundle 0, the Serve replica itself (it only relays calls to the ranks).
DEFAULT_REPLICA_CPUS = 0.1

# How long a dead rank's collective partner may take to fail before we report the first error.
_FAILURE_GRACE_S = 3.0


# ---------------------------------------------------------------------------------------------
# Validation and placement-group layout
# ---------------------------------------------------------------------------------------------


def _profile_of(profile_or_config: ModelProfile | AppConfig) -> ModelProfile:
    if isinstance(profile_or_config, AppConfig):
        return profile_or_config.model_profile
    return profile_or_config


def valid_tp_sizes(profile: ModelProfile | AppConfig) -> list[int]:
    """Tensor-parallel sizes this profile accepts (see `config.valid_tp_sizes`)."""
    return config_valid_tp_sizes(_profile_of(profile))


def validate_layout(profile: ModelProfile | AppConfig) -> ParallelLayout:
    """Check the profile's ``parallel`` layout before any worker starts; returns it.

    The same check `ModelProfile` runs when validated (`config.check_parallel`), repeated here
    for profiles built without validation.
    """
    return check_parallel(_profile_of(profile))


def validate_tp(profile: ModelProfile | AppConfig) -> int:
    """``validate_layout(profile).tp``."""
    return validate_layout(profile).tp


def rank_bundle(profile: ModelProfile, cpus_per_rank: float = DEFAULT_CPUS_PER_RANK) -> dict[str, float]:
    """Resources of one rank: a GPU (and a CPU) on GPU profiles, a CPU fraction otherwise."""
    if profile.device == "cuda":
        return {"GPU": 1, "CPU": 1}
    return {"CPU": float(cpus_per_rank)}


def placement_group_bundles(
    profile: ModelProfile | AppConfig,
    cpus_per_rank: float = DEFAULT_CPUS_PER_RANK,
    replica_cpus: float = DEFAULT_REPLICA_CPUS,
) -> list[dict[str, float]]:
    """The Denoiser replica's placement-group bundles (use with ``placement_group_strategy="STRICT_PACK"``).

    Bundle 0 is the replica itself (``{"CPU": replica_cpus}``; the replica's
    ``ray_actor_options`` must fit it), bundles 1..N are the ranks: ``{"GPU": 1, "CPU": 1}`` on GPU
    profiles, ``{"CPU": cpus_per_rank}`` on CPU.  Validates the layout first.
    """
    profile = _profile_of(profile)
    ranks = validate_layout(profile).size
    return [{"CPU": float(replica_cpus)}] + [rank_bundle(profile, cpus_per_rank) for _ in range(ranks)]


# ---------------------------------------------------------------------------------------------
# The front: what the Serve replica holds
# ---------------------------------------------------------------------------------------------


def _describe(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    lines = text.splitlines()
    return lines[-1] if len(lines) > 6 else text


def _ping(worker) -> Any:
    """``worker.ping`` in the actor's "health" concurrency group (not queued behind a step)."""
    return worker.ping.options(concurrency_group="health").remote()


class ParallelRun:
    """A step-by-step run on the group (the ``DenoiseRun`` interface: ``advance``, ``done``, ``latents``)."""

    def __init__(self, owner: "ParallelDenoiser", run_id: int, plan: GenerationPlan, steps: int, windows: int):
        self.owner = owner
        self.run_id = run_id
        self.plan = plan
        self.steps = steps
        self.windows = windows
        self.step = 0  # steps completed
        self.window = 0  # windows of the current step completed
        self._released = False

    @property
    def done(self) -> bool:
        return self.step >= self.steps

    def advance(self) -> dict[str, int]:
        """Run the next (step, window) unit on every rank; rank 0's progress dict."""
        if self.done:
            raise RuntimeError(f"denoising already finished: {self.step}/{self.steps} steps")
        event = self.owner._call_all("advance", self.run_id, timeout=self.owner.step_timeout_s)[0]
        if event["window"] >= event["windows"]:
            self.step, self.window = event["step"], 0
        else:
            self.step, self.window = event["step"] - 1, event["window"]
        return event

    def latents(self) -> torch.Tensor:
        """The final latents from rank 0 (float32, CPU); only valid once ``done``."""
        if not self.done:
            raise RuntimeError(f"denoising not finished: {self.step}/{self.steps} steps")
        out = self.owner._call_ranks("latents", [0], self.run_id, True, timeout=self.owner.step_timeout_s)[0]
        self.release()
        return out

    def release(self) -> None:
        """Free the run's state on every rank (fire and forget)."""
        if not self._released:
            self._released = True
            self.owner._release(self.run_id)


class ParallelDenoiser:
    """A Denoiser whose transformer runs over ``parallel.size`` Ray worker actors (the profile's layout).

    Duck-types :class:`~vidgen_serve.pipeline.denoiser.Denoiser`: :meth:`start` returns a run
    with ``advance()``/``done``/``latents()``, :meth:`denoise` runs the whole loop.  Plus
    :meth:`check_health` (raises when a rank died, hangs, or the group broke) and :meth:`close`.

    Args:
        config: application config; its profile's ``parallel`` layout gives the group size.
        checkpoint: checkpoint path (default: the profile's, resolved here).
        placement_group: the group whose bundles ``bundle_offset .. bundle_offset+N-1`` hold the
            ranks.  Default: the caller's current placement group (a Serve replica's), ranks in
            bundles 1..N; without one, a ``STRICT_PACK`` group of N rank bundles is created here
            and removed by :meth:`close`.
        cpus_per_rank: CPU fraction per rank in a created placement group (CPU profiles).
        setup_timeout_s / step_timeout_s / health_timeout_s: limits on group formation + model
            load, one (step, window) unit, and a health ping.
    """

    def __init__(
        self,
        config: AppConfig,
        checkpoint: str | None = None,
        *,
        placement_group: Any = None,
        bundle_offset: int | None = None,
        cpus_per_rank: float = DEFAULT_CPUS_PER_RANK,
        setup_timeout_s: float = 600.0,
        step_timeout_s: float = 600.0,
        health_timeout_s: float = 30.0,
        max_styles: int | None = None,
    ):
        self.config = config
        self.profile = config.model_profile
        self.layout = validate_layout(self.profile)  # before any worker (or placement group) starts
        self.world_size = self.layout.size

        import ray
        from ray.util.placement_group import get_current_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if not ray.is_initialized():
            raise RuntimeError("ParallelDenoiser needs Ray (ray.init() or a Serve replica); "
                               "use LocalParallelDenoiser for a local group")

        from ..models.loading import resolve_checkpoint

        self.checkpoint = checkpoint or resolve_checkpoint(config)
        self.device = torch.device("cpu")  # where latents come back
        self.step_timeout_s = step_timeout_s
        self.health_timeout_s = health_timeout_s
        self.workers: list[Any] = []
        self._owns_pg = False
        self._pg = None
        self._broken: str | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._run_ids = itertools.count(1)

        try:
            pg = placement_group if placement_group is not None else get_current_placement_group()
            if pg is None:
                bundles = [rank_bundle(self.profile, cpus_per_rank) for _ in range(self.world_size)]
                pg = ray.util.placement_group(bundles, strategy="STRICT_PACK",
                                              name=f"vidgen-tp-{id(self):x}")
                self._pg, self._owns_pg = pg, True
                offset = 0 if bundle_offset is None else bundle_offset
                try:
                    ray.get(pg.ready(), timeout=setup_timeout_s)
                except ray.exceptions.GetTimeoutError:
                    raise RuntimeError(
                        f"could not reserve {self.world_size} rank bundles {bundles} (STRICT_PACK) within "
                        f"{setup_timeout_s:.0f}s; cluster resources: {ray.cluster_resources()}"
                    ) from None
            else:
                self._pg = pg
                offset = 1 if bundle_offset is None else bundle_offset
            specs = list(pg.bundle_specs)
            if len(specs) < offset + self.world_size:
                raise RuntimeError(
                    f"placement group has {len(specs)} bundles; the parallel layout's {self.world_size} ranks need "
                    f"{offset + self.world_size} (bundle 0 for the replica, one per rank: use "
                    f"placement_group_bundles(profile))"
                )

            worker_cls = ray.remote(concurrency_groups={"health": 1})(ParallelWorker)
            for rank in range(self.world_size):
                spec = specs[offset + rank]
                options: dict[str, Any] = dict(
                    num_cpus=spec.get("CPU", 0),
                    num_gpus=spec.get("GPU", 0),
                    max_restarts=0,
                    max_task_retries=0,
                    name=None,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        placement_group=pg,
                        placement_group_bundle_index=offset + rank,
                        placement_group_capture_child_tasks=False,
                    ),
                )
                self.workers.append(
                    worker_cls.options(**options).remote(rank, self.world_size, config, self.checkpoint,
                                                         max_styles=max_styles)
                )
            master_addr, master_port = self._call_ranks("rendezvous", [0], timeout=setup_timeout_s)[0]
            self._call_all("setup", master_addr, master_port, setup_timeout_s, timeout=setup_timeout_s)
            self._broken = None
        except BaseException:
            self.close()
            raise

    # -- calls to the ranks --------------------------------------------------------------------

    def _call_all(self, method: str, *args: Any, timeout: float) -> list[Any]:
        return self._call_ranks(method, range(len(self.workers)), *args, timeout=timeout)

    def _call_ranks(self, method: str, ranks: Sequence[int], *args: Any, timeout: float) -> list[Any]:
        """Call ``method`` on ``ranks`` (submitted together, in rank order); their results.

        On a dead rank, a failed rank or a timeout the group is marked broken and a
        ``RuntimeError`` names the rank (dead ranks first: a dead rank makes its peers fail in
        their collectives, and that is the symptom, not the cause).
        """
        import ray
        from ray.exceptions import RayActorError

        if self._closed:
            raise RuntimeError("parallel worker group is closed")
        if self._broken:
            raise RuntimeError(f"parallel worker group is broken: {self._broken}")
        ranks = list(ranks)
        with self._lock:  # one submitter at a time: every rank sees the calls in the same order
            refs = [getattr(self.workers[r], method).remote(*args) for r in ranks]
        rank_of = {ref: r for ref, r in zip(refs, ranks)}
        results: dict[int, Any] = {}
        errors: dict[int, tuple[str, BaseException]] = {}
        pending = list(refs)
        deadline = time.monotonic() + timeout
        grace_deadline = None
        while pending:
            now = time.monotonic()
            limit = deadline if grace_deadline is None else min(deadline, grace_deadline)
            if now >= limit:
                break
            ready, pending = ray.wait(pending, num_returns=1, timeout=limit - now)
            for ref in ready:
                r = rank_of[ref]
                try:
                    results[r] = ray.get(ref)
                except RayActorError as exc:
                    errors[r] = ("died", exc)
                except Exception as exc:  # noqa: BLE001 - RayTaskError from the rank
                    errors[r] = ("failed", exc)
                if errors and grace_deadline is None:
                    grace_deadline = time.monotonic() + _FAILURE_GRACE_S
        if errors:
            died = sorted(r for r, (kind, _) in errors.items() if kind == "died")
            # A peer blocked in a collective with a dead rank may not have failed yet: ask.
            if not died:
                died = [r for r in self._dead_ranks(exclude=errors) if r not in errors]
                for r in died:
                    errors[r] = ("died", RuntimeError("actor is dead"))
            first = died[0] if died else min(errors)
            kind, exc = errors[first]
            message = f"parallel rank {first} {kind}: {_describe(exc)} (during {method})"
            others = [f"rank {r} {k}" for r, (k, _) in sorted(errors.items()) if r != first]
            if others:
                message += f" (also: {', '.join(others)})"
            self._mark_broken(message)
            raise RuntimeError(message) from exc
        if pending:
            missing = sorted(rank_of[ref] for ref in pending)
            message = (f"parallel {method} timed out after {timeout:.0f}s; "
                       f"ranks not answering: {missing}")
            self._mark_broken(message)
            raise RuntimeError(message)
        return [results[r] for r in ranks]

    def _dead_ranks(self, exclude=()) -> list[int]:
        """Ranks whose actor no longer answers a ping (short timeout)."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        dead = []
        refs = {r: _ping(w) for r, w in enumerate(self.workers) if r not in exclude}
        for r, ref in refs.items():
            try:
                ray.get(ref, timeout=2.0)
            except RayActorError:
                dead.append(r)
            except (GetTimeoutError, Exception) as exc:  # noqa: BLE001 - alive, only slow or failing
                logger.debug("rank %d: no answer to its ping yet (%r)", r, exc)
        return dead

    def _mark_broken(self, message: str) -> None:
        if self._broken is None:
            logger.error("parallel worker group broken: %s", message)
            self._broken = message

    def _release(self, run_id: int) -> None:
        if self._closed or self._broken:
            return
        with self._lock:
            for w in self.workers:
                try:
                    w.release.remote(run_id)
                except Exception as exc:  # noqa: BLE001
                    logger.debug("releasing run %s on a rank failed: %r", run_id, exc)

    # -- the Denoiser interface ----------------------------------------------------------------

    @property
    def broken(self) -> str | None:
        """Why the group is unusable (None while healthy)."""
        return self._broken

    def start(self, plan: GenerationPlan, embeddings) -> ParallelRun:
        """Start a run on every rank (same plan and embeddings everywhere)."""
        import ray

        run_id = next(self._run_ids)
        plan_ref, emb_ref = ray.put(plan), ray.put(embeddings)
        infos = self._call_all("start", plan_ref, emb_ref, run_id, timeout=self.step_timeout_s)
        errors = [info["error"] for info in infos if "error" in info]
        if errors:  # the style's adapter could not be loaded (on every rank: the same file)
            self._release(run_id)
            raise errors[0]
        info = infos[0]
        return ParallelRun(self, run_id, plan, info["steps"], info["windows"])

    def load_style(self, style: str) -> bool:
        """Load ``style``'s LoRA adapter on every rank (LRU per rank); True if it was read now.

        Raises ``StyleUnavailable`` (the group stays healthy) when the adapter can't be read.
        """
        results = self._call_all("load_style", style, timeout=self.step_timeout_s)
        errors = [r["error"] for r in results if "error" in r]
        if errors:
            raise errors[0]
        return results[0]["loaded"]

    def unload_style(self, style: str) -> bool:
        """Unload ``style``'s adapter on every rank; True if it was loaded."""
        return self._call_all("unload_style", style, timeout=self.step_timeout_s)[0]

    def style_stats(self) -> dict:
        """Rank 0's style adapters (every rank runs the same loads and evictions)."""
        return self._call_ranks("style_stats", [0], timeout=self.health_timeout_s)[0]

    def denoise(self, plan: GenerationPlan, embeddings, progress=None, should_cancel=None) -> torch.Tensor:
        """The whole sampling loop (see ``Denoiser.denoise``); latents from rank 0."""
        return drive(self.start(plan, embeddings), progress, should_cancel)

    def parameter_bytes(self) -> list[int]:
        """Transformer parameter bytes held by each rank."""
        return self._call_all("parameter_bytes", timeout=self.health_timeout_s)

    def check_health(self) -> None:
        """Raise ``RuntimeError`` when the group is closed or broken, or a rank is dead or does
        not answer a ping within ``health_timeout_s`` (pings run beside a step in progress)."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        if self._closed:
            raise RuntimeError("parallel worker group is closed")
        if self._broken:
            raise RuntimeError(f"parallel worker group is broken: {self._broken}")
        refs = [_ping(w) for w in self.workers]
        deadline = time.monotonic() + self.health_timeout_s
        for rank, ref in enumerate(refs):
            try:
                ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
            except RayActorError as exc:
                message = f"parallel rank {rank} died: {_describe(exc)}"
                self._mark_broken(message)
                raise RuntimeError(message) from exc
            except GetTimeoutError:
                message = f"parallel rank {rank} did not answer a health ping within {self.health_timeout_s:.0f}s"
                self._mark_broken(message)
                raise RuntimeError(message) from None

    def close(self, timeout_s: float = 10.0) -> None:
        """Kill the rank actors (waiting until they are gone) and remove a placement group
        created here.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            import ray
        except ImportError:  # pragma: no cover
            return
        if not ray.is_initialized():
            self.workers = []
            return
        from ray.exceptions import RayActorError

        workers, self.workers = self.workers, []
        if workers and not self._broken:
            # Leave the process group cleanly where possible (a broken one may hang in it).
            try:
                ray.wait([w.shutdown.remote() for w in workers], num_returns=len(workers), timeout=min(5.0, timeout_s))
            except Exception as exc:  # noqa: BLE001
                logger.debug("ranks did not shut down cleanly: %r", exc)
        for w in workers:
            try:
                ray.kill(w, no_restart=True)
            except Exception as exc:  # noqa: BLE001
                logger.debug("killing a rank failed: %r", exc)
        # Wait for the kills to land: a call on a killed actor fails with RayActorError.
        deadline = time.monotonic() + timeout_s
        for w in workers:
            while time.monotonic() < deadline:
                try:
                    ray.get(_ping(w), timeout=max(0.1, min(1.0, deadline - time.monotonic())))
                except RayActorError:
                    break
                except Exception:  # noqa: BLE001 - timeout: still dying
                    pass
                time.sleep(0.05)
        if self._owns_pg and self._pg is not None:
            try:
                ray.util.remove_placement_group(self._pg)
            except Exception as exc:  # noqa: BLE001
                logger.debug("removing the placement group failed: %r", exc)
        self._pg = None

    def __enter__(self) -> "ParallelDenoiser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


#: The names from before the group carried Ulysses and CFG layouts (serving code imports them).
TensorParallelDenoiser = ParallelDenoiser
TensorParallelRun = ParallelRun
