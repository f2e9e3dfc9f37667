"""A Wan transformer laid out over a worker group: TP sharding, Ulysses and CFG hooks, sharded load.

:func:`parallelize_transformer` applies a layout's plans (``tensor_parallel`` ->
``sequence_parallel`` -> ``cfg_parallel``) to a transformer in memory (benchmarks, tests).

:func:`load_parallel_transformer` is what a rank worker does with a checkpoint, without ever
holding the whole transformer in host memory: the model is built on the meta device (no
weights), DeepSpeed shards it there (shapes only), and each rank then reads *only its slice* of
every tensor from the checkpoint's safetensors files, straight into the dtype and onto the
device it runs on.  Host memory per rank is its shard plus the replicated tensors plus one
tensor in flight, instead of a full copy per rank (docs/parallel.md, "Host memory").
"""

from __future__ import annotations

import json
from pathlib import Path
import torch
from torch import nn

from ..config import ModelProfile
from ..errors import VidgenError
from .process_group import ParallelGroups

__all__ = [
    "build_empty_transformer",
    "load_checkpoint_shards",
    "load_parallel_transformer",
    "parallelize_transformer",
    "transformer_weight_files",
]

_SUBFOLDER = "transformer"
_WEIGHTS = "diffusion_pytorch_model.safetensors"


def parallelize_transformer(
    transformer: nn.Module, groups: ParallelGroups, dtype: torch.dtype | None = None
) -> nn.Module:
    """Apply ``groups.layout`` to ``transformer`` (a ``WanTransformer3DModel``) in place, collectively.

    TP first (DeepSpeed swaps the linears and fixes heads/norms), then Ulysses' self-attention
    processors and sequence hooks, then the CFG batch hooks around the whole forward.
    """
    from .cfg_parallel import apply_cfg_parallel
    from .sequence_parallel import apply_ulysses
    from .tensor_parallel import shard_wan_transformer

    layout = groups.layout
    transformer = shard_wan_transformer(transformer, layout.tp, dtype=dtype, tp_group=groups.tp_group)
    if groups.ulysses_group is not None:
        apply_ulysses(transformer, groups.ulysses_group)
    if groups.cfg_group is not None:
        apply_cfg_parallel(transformer, groups.cfg_group)
    return transformer


# ---------------------------------------------------------------------------------------------
# Loading each rank's slices
# ---------------------------------------------------------------------------------------------


def transformer_weight_files(checkpoint: str) -> dict[str, Path]:
    """Tensor name -> safetensors file of the checkpoint's transformer (single file or sharded index).

    A hub id is resolved to its local snapshot (downloaded where the hub is reachable, exactly as
    ``from_pretrained`` would).
    """
    root = Path(checkpoint)
    if not root.is_dir():
        try:
            from huggingface_hub import snapshot_download

            root = Path(snapshot_download(checkpoint, allow_patterns=[f"{_SUBFOLDER}/*"]))
        except Exception as exc:  # noqa: BLE001 - any hub failure is "checkpoint unavailable"
            raise VidgenError(503, f"could not load {_SUBFOLDER} from checkpoint {checkpoint!r}: {exc}",
                              code="checkpoint_unavailable") from exc
    folder = root / _SUBFOLDER
    index = folder / f"{_WEIGHTS}.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / _WEIGHTS
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as fh:
            return {name: single for name in fh.keys()}
    raise VidgenError(503, f"checkpoint {checkpoint!r}: no {_SUBFOLDER}/{_WEIGHTS}[.index.json] "
                           f"(safetensors weights are needed to load slices per rank)",
                      code="checkpoint_unavailable")


def build_empty_transformer(checkpoint: str, dtype: torch.dtype) -> nn.Module:
    """The checkpoint's ``WanTransformer3DModel`` on the meta device (no weights) in ``dtype``.

    Buffers are real (``init_empty_weights`` leaves them on CPU): the rotary tables are computed
    at construction and are not in the checkpoint.
    """
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel

    try:
        config = WanTransformer3DModel.load_config(checkpoint, subfolder=_SUBFOLDER)
    except (OSError, ValueError) as exc:
        raise VidgenError(503, f"could not load {_SUBFOLDER} config from checkpoint {checkpoint!r}: {exc}",
                          code="checkpoint_unavailable") from exc
    from .tensor_parallel import cast_keep_fp32

    with init_empty_weights():
        model = WanTransformer3DModel.from_config(config)
    return cast_keep_fp32(model, dtype).eval().requires_grad_(False)


def _shard_slice(module: nn.Module, param_name: str) -> tuple[int, int] | None:
    """(dim, start) of this rank's slice of ``module.<param_name>`` in the full tensor; None if whole."""
    from deepspeed.module_inject.layers import LinearAllreduce, LinearLayer

    from .tensor_parallel import DistributedRMSNorm

    if isinstance(module, LinearAllreduce):  # row-parallel: input features split, bias whole
        if param_name != "weight":
            return None
        return 1, sum(module._partition_sizes[: module.tp_index])
    if isinstance(module, LinearLayer):  # column-parallel: output features (and bias) split
        return 0, sum(module._partition_sizes[: module.tp_index])
    if isinstance(module, DistributedRMSNorm):
        return 0, module.offset
    return None


def load_checkpoint_shards(
    model: nn.Module, files: dict[str, Path], dtype: torch.dtype, device: torch.device
) -> nn.Module:
    """Fill every parameter of ``model`` (meta, blank or TP-sharded) with its slice of the checkpoint.

    Each tensor is read as a slice of the memory-mapped file (only those pages are touched),
    converted to its diffusers dtype (``dtype``, float32 in ``_keep_in_fp32_modules``) and copied
    onto ``device``; the file is opened per tensor so at most one tensor's pages are mapped at a
    time.  Raises ``VidgenError`` (503) naming a tensor the checkpoint lacks or holds with another
    shape.
    """
    from safetensors import safe_open

    from .tensor_parallel import compute_dtype_of

    for module_name, module in model.named_modules():
        for param_name, param in list(module.named_parameters(recurse=False)):
            name = f"{module_name}.{param_name}" if module_name else param_name
            file = files.get(name)
            if file is None:
                raise VidgenError(503, f"checkpoint has no tensor {name!r} for the transformer",
                                  code="checkpoint_unavailable")
            where = _shard_slice(module, param_name)
            with safe_open(str(file), framework="pt") as fh:
                source = fh.get_slice(name)
                shape = list(source.get_shape())
                index = [slice(None)] * len(shape)
                if where is not None:
                    dim, start = where
                    index[dim] = slice(start, start + param.shape[dim])
                    shape[dim] = param.shape[dim]
                if tuple(shape) != tuple(param.shape):
                    raise VidgenError(503, f"checkpoint tensor {name!r} has shape {source.get_shape()}, the model "
                                           f"expects {tuple(param.shape)} (slice {where})",
                                      code="checkpoint_unavailable")
                # A private copy: the slice is a view into the mapped file.
                value = source[tuple(index)].to(device=device, dtype=compute_dtype_of(model, name, dtype),
                                                copy=True)
            module._parameters[param_name] = nn.Parameter(value, requires_grad=False)
    return model


def load_parallel_transformer(
    checkpoint: str, profile: ModelProfile, groups: ParallelGroups, device: torch.device
) -> nn.Module:
    """This rank's transformer for ``groups.layout``, loaded slice by slice (collective)."""
    from ..models.loading import DTYPES

    dtype = DTYPES[profile.dtype]
    files = transformer_weight_files(checkpoint)
    model = build_empty_transformer(checkpoint, dtype)
    # TP shards the meta model (DeepSpeed then re-allocates it blank on this rank's device);
    # Ulysses/CFG only add hooks, so the order of loading and hooking does not matter.
    model = parallelize_transformer(model, groups, dtype=dtype)
    model = load_checkpoint_shards(model, files, dtype, device)
    # The parameters are on `device` already; this moves the (CPU-built) rotary tables.
    return model.to(device).eval().requires_grad_(False)
