"""The worker group's ``torch.distributed`` process group and its TP / Ulysses / CFG sub-groups.

One group of ``tp * ulysses * cfg`` ranks (NCCL on GPU, gloo on CPU), registered with DeepSpeed,
split by a ``DeviceMesh`` of shape ``(cfg, ulysses, tp)``: TP innermost, so on a node its
frequent all-reduces run between neighbouring GPUs, then Ulysses' all-to-alls, then CFG's one
all-gather per step.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..config import ParallelLayout

__all__ = [
    "ParallelGroups",
    "build_parallel_groups",
    "cpu_supports_deepspeed_shm",
    "default_backend",
    "disable_unsupported_deepspeed_ops",
    "init_process_group",
    "init_tp_process_group",
    "join_store",
    "listen_store",
]


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_supports_deepspeed_shm() -> bool:
    """Whether DeepSpeed's CPU shared-memory all-reduce kernels can run here (needs AVX-512)."""
    return "avx512f" in _cpu_flags()


def disable_unsupported_deepspeed_ops() -> bool:
    """Turn DeepSpeed's shared-memory all-reduce op off where it crashes; call before
    ``deepspeed.init_distributed`` / ``init_inference``.

    DeepSpeed 0.19 builds ``deepspeed_shm_comm`` for CPU all-reduces when it thinks the op is
    compatible; on AVX2-only CPUs (no ``avx512f``) its kernels segfault, so rank processes die
    in the first all-reduce.  With the op marked incompatible DeepSpeed falls back to the
    process group's own all-reduce (gloo on CPU).  On CUDA the op is never wanted either
    (NCCL does the all-reduce), so it is disabled whenever CUDA is not in use or AVX-512 is
    missing.  Returns True when it disabled the op.
    """
    import deepspeed.ops

    if torch.cuda.is_available() and cpu_supports_deepspeed_shm():
        return False
    # Accessing __compatible_ops__ triggers DeepSpeed's one-off probe; the dict it caches is the
    # one build_shm_op() reads, so the edit sticks for this process.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return True


def default_backend() -> str:
    """NCCL where CUDA is available, gloo otherwise."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_process_group(
    rank: int,
    world_size: int,
    master_addr: str = "127.0.0.1",
    master_port: int = 29500,
    backend: str | None = None,
    local_rank: int | None = None,
    timeout_s: float = 600.0,
    store: dist.Store | None = None,
) -> str:
    """Join a ``torch.distributed`` group of ``world_size`` ranks and register it with DeepSpeed.

    NCCL when CUDA is available and ``backend`` is None, gloo otherwise.  On NCCL the CUDA
    device is set to ``local_rank`` (defaults to ``rank``).  Sets the ``RANK``/``WORLD_SIZE``/
    ``MASTER_ADDR``/``MASTER_PORT``/``LOCAL_RANK`` env vars DeepSpeed reads, disables the
    DeepSpeed shm op where it would crash, then calls ``deepspeed.init_distributed`` (which
    wraps the existing torch group).  Returns the backend used.  Idempotent.

    ``store``: the group's rendezvous store, when the caller holds one (rank 0's, from
    :func:`listen_store`, or :func:`join_store`'s client of it); default: a ``tcp://`` rendezvous
    at ``master_addr:master_port`` (every rank must then use it).
    """
    if backend is None:
        backend = default_backend()
    if local_rank is None:
        local_rank = rank
    os.environ["MASTER_ADDR"] = str(master_addr)
    os.environ["MASTER_PORT"] = str(master_port)
    os.environ["RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(world_size)
    os.environ["LOCAL_RANK"] = str(local_rank)
    os.environ["LOCAL_WORLD_SIZE"] = str(world_size)
    if backend == "nccl":
        torch.cuda.set_device(local_rank)

    disable_unsupported_deepspeed_ops()

    timeout = datetime.timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        if store is not None:
            dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
        else:
            dist.init_process_group(
                backend=backend,
                init_method=f"tcp://{master_addr}:{master_port}",
                rank=rank,
                world_size=world_size,
                timeout=timeout,
            )

    import deepspeed
    import deepspeed.comm as ds_comm

    if not ds_comm.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                                   timeout=timeout)
    return backend


def listen_store(host: str, world_size: int, timeout_s: float = 600.0, port: int = 0) -> dist.TCPStore:
    """Rank 0's rendezvous store, listening on ``port`` (0: a port the OS picks, ``store.port``).

    With port 0 the port is bound when it is chosen and held until the group forms, so no other
    process can take it in between (picking a free port first and binding it later races with
    every other process opening ports on the node).
    """
    return dist.TCPStore(host, int(port), world_size, is_master=True, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=timeout_s))


def join_store(host: str, port: int, world_size: int, timeout_s: float = 600.0) -> dist.TCPStore:
    """A client of rank 0's :func:`listen_store` (the other ranks' side of the rendezvous)."""
    return dist.TCPStore(host, int(port), world_size, is_master=False,
                         timeout=datetime.timedelta(seconds=timeout_s))


#: The name the tensor-parallel code used before the group carried other layouts.
init_tp_process_group = init_process_group


@dataclass(frozen=True)
class ParallelGroups:
    """This rank's place in a ``{tp, ulysses, cfg}`` layout and the process groups of each dimension.

    A group is None where its degree is 1 (no communication along that dimension).
    """

    layout: ParallelLayout
    rank: int
    tp_group: dist.ProcessGroup | None
    ulysses_group: dist.ProcessGroup | None
    cfg_group: dist.ProcessGroup | None
    tp_rank: int
    ulysses_rank: int
    cfg_rank: int

    @classmethod
    def single(cls) -> "ParallelGroups":
        """One rank, no groups (the layout {1, 1, 1})."""
        return cls(ParallelLayout(), 0, None, None, None, 0, 0, 0)


def build_parallel_groups(layout: ParallelLayout) -> ParallelGroups:
    """Split the initialised world into the layout's sub-groups (collective: call on every rank).

    The world size must equal ``layout.size``; ranks map to mesh coordinates row-major over
    ``(cfg, ulysses, tp)``.
    """
    if layout.size == 1:
        return ParallelGroups.single()
    if not dist.is_initialized():
        raise RuntimeError("build_parallel_groups needs an initialised process group (init_process_group)")
    world = dist.get_world_size()
    if world != layout.size:
        raise ValueError(f"parallel layout tp={layout.tp} x ulysses={layout.ulysses} x cfg={layout.cfg} "
                         f"needs {layout.size} ranks; the process group has {world}")
    from torch.distributed.device_mesh import init_device_mesh

    device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    mesh = init_device_mesh(device_type, (layout.cfg, layout.ulysses, layout.tp),
                            mesh_dim_names=("cfg", "ulysses", "tp"))

    def group(name: str, degree: int):
        return mesh.get_group(name) if degree > 1 else None

    return ParallelGroups(
        layout=layout,
        rank=dist.get_rank(),
        tp_group=group("tp", layout.tp),
        ulysses_group=group("ulysses", layout.ulysses),
        cfg_group=group("cfg", layout.cfg),
        tp_rank=mesh.get_local_rank("tp"),
        ulysses_rank=mesh.get_local_rank("ulysses"),
        cfg_rank=mesh.get_local_rank("cfg"),
    )
