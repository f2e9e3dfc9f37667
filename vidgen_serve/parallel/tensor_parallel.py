"""Tensor-parallel sharding of diffusers' ``WanTransformer3DModel`` (torch.distributed + DeepSpeed).

See ``DESIGN.md`` -> "Tensor-parallel denoiser".  DeepSpeed's AutoTP (``init_inference`` with a
user ``injection_policy``) splits the linears of every ``WanTransformerBlock``:

* column-parallel (output features split, no communication): ``to_q``/``to_k``/``to_v`` of both
  attentions (and ``add_k_proj``/``add_v_proj`` for I2V), ``ffn.net.0.proj``;
* row-parallel (input features split, all-reduce of the output): ``attn1.to_out.0``,
  ``attn2.to_out.0``, ``ffn.net.2``.

DeepSpeed matches the policy names against the linear's *parent.child* name, so the row-parallel
entries must be ``"to_out.0"`` and ``"net.2"`` (full paths silently match nothing and every linear
becomes column-parallel).  Two things DeepSpeed does not do for Wan and this module does:

1. ``attn.heads //= tp_size`` on ``attn1``/``attn2`` (the processor unflattens by ``attn.heads``);
2. Wan's q/k RMSNorm normalises across *all* heads (``normalized_shape = heads*head_dim``), so
   a per-shard norm is wrong; :class:`DistributedRMSNorm` all-reduces the sum of squares.

Nothing here depends on Ray; the Ray worker actors call :func:`init_tp_process_group` and
:func:`shard_wan_transformer`, the CLI and tests use :func:`run_local_tp_group`.
"""

from __future__ import annotations

import datetime
import io
import os
import queue as queue_mod
import socket
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistributedRMSNorm",
    "cpu_supports_deepspeed_shm",
    "disable_unsupported_deepspeed_ops",
    "find_free_port",
    "init_tp_process_group",
    "parameter_bytes",
    "run_local_tp_group",
    "shard_wan_transformer",
    "sharded_forward_worker",
    "ROW_PARALLEL_LINEARS",
]

#: DeepSpeed injection-policy names of the row-parallel (all-reduce) linears of a Wan block,
#: in DeepSpeed's *parent.child* form: ``attn1.to_out.0``, ``attn2.to_out.0`` and ``ffn.net.2``.
ROW_PARALLEL_LINEARS: tuple[str, ...] = ("to_out.0", "net.2")


# ---------------------------------------------------------------------------------------------
# Process group / DeepSpeed setup
# ---------------------------------------------------------------------------------------------


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


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (bind to port 0 and release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_tp_process_group(
    rank: int,
    world_size: int,
    master_addr: str = "127.0.0.1",
    master_port: int = 29500,
    backend: str | None = None,
    local_rank: int | None = None,
    timeout_s: float = 600.0,
) -> str:
    """Join a ``torch.distributed`` group of ``world_size`` ranks and register it with DeepSpeed.

    NCCL when CUDA is available and ``backend`` is None, gloo otherwise.  On NCCL the CUDA
    device is set to ``local_rank`` (defaults to ``rank``).  Sets the ``RANK``/``WORLD_SIZE``/
    ``MASTER_ADDR``/``MASTER_PORT``/``LOCAL_RANK`` env vars DeepSpeed reads, disables the
    DeepSpeed shm op where it would crash, then calls ``deepspeed.init_distributed`` (which
    wraps the existing torch group).  Returns the backend used.  Idempotent.
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
    os.environ.setdefault("LOCAL_WORLD_SIZE", str(world_size))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)

    disable_unsupported_deepspeed_ops()

    timeout = datetime.timedelta(seconds=timeout_s)
    if not dist.is_initialized():
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


# ---------------------------------------------------------------------------------------------
# Distributed RMSNorm
# ---------------------------------------------------------------------------------------------


class DistributedRMSNorm(nn.Module):
    """RMSNorm over a feature dimension that is sharded across a tensor-parallel group.

    Equivalent to ``torch.nn.RMSNorm(full_width)`` applied to the concatenation of all ranks'
    shards: each rank holds its slice of the weight, sums the squares of its local features,
    all-reduces that sum over ``group`` and divides by ``full_width``.
    """

    def __init__(
        self,
        weight_shard: torch.Tensor | None,
        full_width: int,
        eps: float | None = None,
        group: dist.ProcessGroup | None = None,
        local_width: int | None = None,
    ):
        super().__init__()
        if weight_shard is not None:
            self.weight = nn.Parameter(weight_shard.detach().clone(), requires_grad=False)
            local_width = weight_shard.shape[-1]
        else:
            self.register_parameter("weight", None)
        if local_width is None:
            raise ValueError("DistributedRMSNorm needs weight_shard or local_width")
        self.local_width = int(local_width)
        self.full_width = int(full_width)
        self.eps = eps
        self.group = group

    def extra_repr(self) -> str:
        return f"local_width={self.local_width}, full_width={self.full_width}, eps={self.eps}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.local_width:
            raise ValueError(f"DistributedRMSNorm expected last dim {self.local_width}, got {x.shape[-1]}")
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        xf = x.float()
        sum_sq = xf.pow(2).sum(dim=-1, keepdim=True)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sum_sq, op=dist.ReduceOp.SUM, group=self.group)
        out = xf * torch.rsqrt(sum_sq / self.full_width + eps)
        if self.weight is not None:
            out = out * self.weight.float()
        return out.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Sharding
# ---------------------------------------------------------------------------------------------

# (norm attribute, the column-parallel linear whose output it normalises)
_NORM_TO_LINEAR = (("norm_q", "to_q"), ("norm_k", "to_k"), ("norm_added_k", "add_k_proj"))


def _out_features(linear: nn.Module) -> int:
    return int(linear.weight.shape[0])


def _attn_norm_sites(blocks):
    """(attn, norm_name, linear_name) for every RMSNorm that needs replacing, in fixed order."""
    sites = []
    for block in blocks:
        for attn_name in ("attn1", "attn2"):
            attn = getattr(block, attn_name, None)
            if attn is None:
                continue
            for norm_name, linear_name in _NORM_TO_LINEAR:
                norm = getattr(attn, norm_name, None)
                linear = getattr(attn, linear_name, None)
                if isinstance(norm, nn.RMSNorm) and linear is not None:
                    sites.append((attn, norm_name, linear_name))
    return sites


def _keep_fp32_names(module: nn.Module) -> list[str]:
    return list(getattr(module, "_keep_in_fp32_modules", None) or [])


def _in_keep_fp32(name: str, keep: list[str]) -> bool:
    parts = name.split(".")
    return any(k in parts for k in keep)


def _cast_keep_fp32(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``module.to(dtype)`` except diffusers' ``_keep_in_fp32_modules`` (rope, time embedder,
    scale-shift tables, norms for Wan), which stay float32 as ``from_pretrained`` keeps them."""
    keep = _keep_fp32_names(module)
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if not t.is_floating_point():
            continue
        target = torch.float32 if (keep and _in_keep_fp32(name, keep)) else dtype
        if t.dtype != target:
            t.data = t.data.to(target)
    return module


def _snapshot_keep_fp32(module: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    keep = _keep_fp32_names(module)
    if not keep or dtype == torch.float32:
        return {}
    return {name: t.detach().clone()
            for name, t in list(module.named_parameters()) + list(module.named_buffers())
            if t.dtype == torch.float32 and _in_keep_fp32(name, keep)}


def _restore_keep_fp32(module: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    """Undo DeepSpeed's whole-module ``.bfloat16()``/``.half()`` for the fp32-kept tensors."""
    tensors = dict(module.named_parameters())
    tensors.update(dict(module.named_buffers()))
    for name, saved in snapshot.items():
        t = tensors.get(name)
        if t is not None and t.shape == saved.shape:
            t.data = saved.to(t.device)


def shard_wan_transformer(
    transformer: nn.Module,
    tp_size: int,
    dtype: torch.dtype | None = None,
    tp_group: dist.ProcessGroup | None = None,
) -> nn.Module:
    """Shard a ``WanTransformer3DModel`` over a ``tp_size`` tensor-parallel group, in place.

    Must be called on every rank of an initialised group (see :func:`init_tp_process_group`)
    with identical weights.  Returns the sharded module (the same ``WanTransformer3DModel``
    object, so ``.config``/``.dtype`` keep working for diffusers pipelines).
    """
    from diffusers.models.transformers.transformer_wan import WanTransformerBlock

    config = getattr(transformer, "config", None)
    heads = getattr(config, "num_attention_heads", None)
    if heads is None:
        heads = transformer.blocks[0].attn1.heads
    tp_size = int(tp_size)
    if tp_size < 1:
        raise ValueError(f"tp_size must be >= 1, got {tp_size}")
    if heads % tp_size != 0:
        raise ValueError(
            f"Tensor parallelism needs num_attention_heads divisible by tp_size: "
            f"num_attention_heads={heads} is not divisible by tp_size={tp_size}"
        )
    if tp_size == 1:
        if dtype is not None:
            _cast_keep_fp32(transformer, dtype)
        return transformer
    if not dist.is_initialized():
        raise RuntimeError("shard_wan_transformer needs an initialised torch.distributed group "
                           "(call init_tp_process_group first)")
    if tp_group is None and dist.get_world_size() != tp_size:
        raise ValueError(f"tp_size={tp_size} differs from world size {dist.get_world_size()}; pass tp_group")

    for i, block in enumerate(transformer.blocks):
        for attn_name in ("attn1", "attn2"):
            attn = getattr(block, attn_name)
            if attn.heads % tp_size != 0:
                raise ValueError(f"blocks.{i}.{attn_name}: heads={attn.heads} is not divisible by "
                                 f"tp_size={tp_size}")
            if getattr(attn, "fused_projections", False):
                # A fused to_qkv would be split contiguously, mixing q/k/v across ranks.
                attn.unfuse_projections()

    import deepspeed

    disable_unsupported_deepspeed_ops()
    if dtype is None:
        # The dominant dtype: the transformer's linears (fp32-kept modules are small).
        dtype = transformer.blocks[0].attn1.to_q.weight.dtype
    # DeepSpeed casts the *whole* module to `dtype`; keep diffusers' fp32 modules fp32.
    _cast_keep_fp32(transformer, dtype)
    fp32_snapshot = _snapshot_keep_fp32(transformer, dtype)

    blocks = list(transformer.blocks)
    # Original norms (full weights), captured before DeepSpeed touches the model.
    sites = _attn_norm_sites(blocks)
    full = []
    for attn, norm_name, linear_name in sites:
        norm = getattr(attn, norm_name)
        full_width = int(norm.normalized_shape[-1])
        if _out_features(getattr(attn, linear_name)) != full_width:
            raise ValueError(f"{linear_name} out_features != {norm_name} width ({full_width})")
        weight = norm.weight.detach().to(dtype).clone() if norm.weight is not None else None
        full.append((full_width, norm.eps, weight))

    tensor_parallel: dict[str, Any] = {"tp_size": tp_size}
    if tp_group is not None:
        tensor_parallel["tp_group"] = tp_group
    engine = deepspeed.init_inference(
        transformer,
        tensor_parallel=tensor_parallel,
        dtype=dtype,
        injection_policy={WanTransformerBlock: ROW_PARALLEL_LINEARS},
        replace_with_kernel_inject=False,
    )
    module = engine.module
    _restore_keep_fp32(module, fp32_snapshot)
    del fp32_snapshot
    group = getattr(engine, "mp_group", None) or tp_group
    tp_rank = dist.get_rank(group=group)

    # Where this rank's columns of each q/k projection start: DeepSpeed splits column-parallel
    # weights into contiguous blocks in rank order (sizes per its AutoTP shard rule), so the
    # offset is the sum of the lower ranks' local widths.  One all_gather for all sites.
    blocks = list(module.blocks)
    sites = _attn_norm_sites(blocks)
    param_device = blocks[0].attn1.to_q.weight.device
    comm_device = param_device if dist.get_backend(group) == "nccl" else torch.device("cpu")
    local = torch.tensor([_out_features(getattr(a, ln)) for a, _, ln in sites], dtype=torch.int64,
                         device=comm_device)
    gathered = [torch.zeros_like(local) for _ in range(tp_size)]
    dist.all_gather(gathered, local, group=group)
    sizes = torch.stack(gathered).cpu()  # (tp_size, n_sites)
    local = local.cpu()
    offsets = sizes[:tp_rank].sum(dim=0) if tp_rank > 0 else torch.zeros_like(local)

    for i, ((attn, norm_name, _), (full_width, eps, weight)) in enumerate(zip(sites, full)):
        if int(sizes[:, i].sum()) != full_width:
            raise RuntimeError(f"sharded widths {sizes[:, i].tolist()} do not add up to {full_width}")
        start, width = int(offsets[i]), int(local[i])
        shard = weight[start:start + width].to(param_device) if weight is not None else None
        setattr(attn, norm_name,
                DistributedRMSNorm(shard, full_width=full_width, eps=eps, group=group, local_width=width))

    for block in blocks:
        for attn_name in ("attn1", "attn2"):
            attn = getattr(block, attn_name)
            local_q = _out_features(attn.to_q)
            attn.heads //= tp_size
            attn.inner_dim = local_q
            attn.kv_inner_dim = _out_features(attn.to_k)
            head_dim = local_q // attn.heads if attn.heads else 0
            if head_dim * attn.heads != local_q:
                raise RuntimeError(f"{attn_name}: local q width {local_q} is not heads({attn.heads})*head_dim")

    module._tp_size = tp_size  # informational
    return module


def parameter_bytes(module: nn.Module) -> int:
    """Bytes of the parameters held by this rank (shared parameters counted once)."""
    seen = set()
    total = 0
    for p in module.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
    return total


# ---------------------------------------------------------------------------------------------
# Local process groups (CLI --tp N, tests, benchmarks)
# ---------------------------------------------------------------------------------------------


def _dumps(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _loads(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=False)


def _local_rank_entry(fn, rank, world_size, port, backend, threads, result_queue, args):
    status, payload = "error", None
    try:
        if threads:
            torch.set_num_threads(threads)
        init_tp_process_group(rank, world_size, "127.0.0.1", port, backend=backend)
        result = fn(rank, world_size, *args)
        status, payload = "ok", (_dumps(result) if rank == 0 else None)
    except BaseException:  # noqa: BLE001 - reported to the parent
        status, payload = "error", traceback.format_exc()
    result_queue.put((rank, status, payload))
    if status == "ok":
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass


def run_local_tp_group(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 600.0,
    backend: str | None = "gloo",
    threads_per_rank: int | None = None,
) -> Any:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned local processes that form
    a process group on 127.0.0.1 (gloo by default; ``backend=None`` picks NCCL on CUDA), and
    return rank 0's result.

    ``fn`` and ``args`` must be picklable (module-level function).  If any rank raises or dies,
    or the whole run exceeds ``timeout`` seconds, the other ranks are terminated and a
    ``RuntimeError`` carrying the failing rank's traceback is raised.  ``threads_per_rank``
    defaults to ``cpu_count // world_size`` so ranks do not oversubscribe the CPU.
    """
    import multiprocessing as mp

    if world_size < 1:
        raise ValueError("world_size must be >= 1")
    if threads_per_rank is None:
        threads_per_rank = max(1, (os.cpu_count() or 1) // world_size)
    ctx = mp.get_context("spawn")
    result_queue = ctx.Queue()
    port = find_free_port()
    procs = [
        ctx.Process(
            target=_local_rank_entry,
            args=(fn, rank, world_size, port, backend, threads_per_rank, result_queue, args),
            name=f"tp-rank-{rank}",
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()

    deadline = time.monotonic() + timeout
    done: dict[int, tuple[str, Any]] = {}
    error: str | None = None

    def drain(wait: float) -> None:
        try:
            while True:
                rank, status, payload = result_queue.get(timeout=wait)
                done[rank] = (status, payload)
                wait = 0.05
        except queue_mod.Empty:
            pass

    def failures() -> list[str]:
        msgs = []
        # Ranks that died without reporting (segfault, os._exit, OOM kill) are usually the root
        # cause; the surviving ranks then fail with "connection reset" in their collectives.
        for r, p in enumerate(procs):
            if r not in done and p.exitcode is not None:
                msgs.append(f"tensor-parallel rank {r}/{world_size} exited with code {p.exitcode} "
                            f"without reporting a result (crash/signal)")
        for r in sorted(done):
            status, payload = done[r]
            if status != "ok":
                msgs.append(f"tensor-parallel rank {r}/{world_size} failed:\n{payload}")
        return msgs

    try:
        while len(done) < world_size:
            drain(0.2)
            msgs = failures()
            if msgs:
                # Let the other ranks' reports (or deaths) land so the root cause is named first
                # (this also absorbs a rank that reported and exited between drain and check).
                time.sleep(0.5)
                drain(0.5)
                msgs = failures()
                if msgs:
                    error = "\n".join(msgs)
                    break
            if time.monotonic() > deadline:
                error = (f"tensor-parallel group of {world_size} timed out after {timeout:.0f}s; "
                         f"ranks that reported: {sorted(done)}")
                break
    finally:
        if error is not None:
            for p in procs:
                if p.is_alive():
                    p.terminate()
        for p in procs:
            p.join(timeout=10 if error is None else 5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        result_queue.close()

    if error is not None:
        raise RuntimeError(error)
    status, payload = done[0]
    return _loads(payload)


# ---------------------------------------------------------------------------------------------
# A reusable worker: build a transformer, shard it, run a forward
# ---------------------------------------------------------------------------------------------


def sharded_forward_worker(
    rank: int,
    world_size: int,
    model_config: dict,
    state_dict: dict,
    inputs: dict,
    dtype: torch.dtype = torch.float32,
    repeats: int = 1,
    warmup: int = 0,
) -> dict:
    """Build ``WanTransformer3DModel(**model_config)``, load ``state_dict``, shard it over the
    group, and run ``transformer(**inputs)``.  Returns (from every rank; the local runner keeps
    rank 0's) ``{"output", "param_bytes", "linear_params", "step_s"}``.
    """
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(**model_config)
    model.load_state_dict(state_dict)
    model = shard_wan_transformer(model.eval(), world_size, dtype=dtype)
    device = next(model.parameters()).device
    kwargs = {
        k: (v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) if torch.is_tensor(v) else v)
        for k, v in inputs.items()
    }
    kwargs.setdefault("return_dict", False)
    with torch.inference_mode():
        for _ in range(warmup):
            model(**kwargs)
        times = []
        out = None
        for _ in range(max(1, repeats)):
            if dist.is_initialized():
                dist.barrier()
            t0 = time.perf_counter()
            out = model(**kwargs)[0]
            times.append(time.perf_counter() - t0)
    linear_params = sum(m.weight.numel() for m in model.blocks.modules()
                        if hasattr(m, "weight") and isinstance(getattr(m, "weight"), torch.Tensor)
                        and m.weight.dim() == 2)
    return {
        "output": out.float().cpu(),
        "param_bytes": parameter_bytes(model),
        "linear_params": linear_params,
        "step_s": min(times),
    }
