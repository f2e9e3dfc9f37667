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

The model may be on the meta device (built without weights): DeepSpeed then shards shapes only
and :func:`.transformer.load_checkpoint_shards` fills each rank's slices from the checkpoint, so no rank ever holds
the whole transformer.  Nothing here depends on Ray.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .process_group import disable_unsupported_deepspeed_ops

__all__ = [
    "DistributedRMSNorm",
    "ROW_PARALLEL_LINEARS",
    "cast_keep_fp32",
    "compute_dtype_of",
    "parameter_bytes",
    "shard_wan_transformer",
]

#: DeepSpeed injection-policy names of the row-parallel (all-reduce) linears of a Wan block,
#: in DeepSpeed's *parent.child* form: ``attn1.to_out.0``, ``attn2.to_out.0`` and ``ffn.net.2``.
ROW_PARALLEL_LINEARS: tuple[str, ...] = ("to_out.0", "net.2")


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
        offset: int = 0,
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
        # Where this shard starts in the full weight (the loader reads the checkpoint slice there).
        self.offset = int(offset)
        self.eps = eps
        self.group = group

    def extra_repr(self) -> str:
        return f"local_width={self.local_width}, full_width={self.full_width}, offset={self.offset}, eps={self.eps}"

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


def compute_dtype_of(module: nn.Module, name: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype diffusers' ``from_pretrained(torch_dtype=dtype)`` gives tensor ``name`` of
    ``module``: float32 inside ``_keep_in_fp32_modules``, ``dtype`` elsewhere."""
    keep = _keep_fp32_names(module)
    return torch.float32 if (keep and _in_keep_fp32(name, keep)) else dtype


def cast_keep_fp32(module: nn.Module, dtype: torch.dtype) -> nn.Module:
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
    """The tensors DeepSpeed's ``init_inference`` would spoil: fp32-kept ones (it casts the whole
    module) and, on a meta-device model, the real buffers (``to_empty`` re-allocates them blank,
    e.g. the rotary tables, which are computed at construction and not in the checkpoint)."""
    keep = _keep_fp32_names(module)
    out = {name: t.detach().clone() for name, t in module.named_buffers() if not t.is_meta}
    if keep and dtype != torch.float32:
        out.update({name: t.detach().clone() for name, t in module.named_parameters()
                    if not t.is_meta and t.dtype == torch.float32 and _in_keep_fp32(name, keep)})
    return out


def _restore_keep_fp32(module: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    """Put back what :func:`_snapshot_keep_fp32` saved."""
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

    Must be called on every rank of an initialised group (see
    :func:`~.process_group.init_process_group`) with identical weights, or with the model on the
    meta device (then every sharded parameter stays meta or blank and
    :func:`~.transformer.load_checkpoint_shards` fills it).  ``tp_group`` is this rank's TP
    group when the world holds other dimensions too (Ulysses, CFG).  Returns the sharded module
    (the same ``WanTransformer3DModel`` object, so ``.config``/``.dtype`` keep working).
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
            cast_keep_fp32(transformer, dtype)
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
    from deepspeed.inference.engine import InferenceEngine

    disable_unsupported_deepspeed_ops()
    if dtype is None:
        # The dominant dtype: the transformer's linears (fp32-kept modules are small).
        # (A meta model's linears carry the dtype they were built with.)
        dtype = transformer.blocks[0].attn1.to_q.weight.dtype
    # DeepSpeed casts the *whole* module to `dtype`; keep diffusers' fp32 modules fp32.
    cast_keep_fp32(transformer, dtype)
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
    # DeepSpeed 0.19 ignores `tp_group` and shards over a class-level cached group of ranks
    # 0..tp_size-1 (created on first use): right only when TP spans the whole world.  Setting the
    # cache to this rank's group makes it use ours (None: let it create its whole-world group;
    # reset every time so a process that shards twice, with different groups, is not misled).
    InferenceEngine.inference_mp_group = tp_group
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
        shard = weight[start:start + width] if weight is not None else None
        if shard is not None and not shard.is_meta:
            shard = shard.to(param_device)
        setattr(attn, norm_name, DistributedRMSNorm(shard, full_width=full_width, eps=eps, group=group,
                                                    local_width=width, offset=start))

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


