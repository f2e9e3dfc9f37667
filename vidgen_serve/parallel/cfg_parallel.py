"""CFG parallelism: the conditional and unconditional passes of a step on two sets of ranks.

The denoiser calls the transformer once per step with the CFG batch ``[cond, uncond]``, exactly
as on one GPU.  With a CFG group of 2, hooks on the transformer hand each rank its half of the
batch (rank 0 of the group the conditional pass, rank 1 the unconditional one) and all-gather
the two outputs back into the batch order, so every rank returns what the batched pass returns
and runs the same scheduler step: no change to the denoising loop.  A batch that does not
split (guidance 1: the conditional pass alone) runs whole on every rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["apply_cfg_parallel"]

# The forward's per-sample inputs (diffusers' WanTransformer3DModel.forward argument names).
_BATCHED_INPUTS = ("hidden_states", "timestep", "encoder_hidden_states", "encoder_hidden_states_image")


def apply_cfg_parallel(transformer: torch.nn.Module, group: dist.ProcessGroup) -> torch.nn.Module:
    """Split every batched forward of ``transformer`` across the CFG ``group``, in place; every
    rank of the group must call it.  Returns the transformer."""
    import inspect

    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    state = {"split": False}
    signature = inspect.signature(transformer.forward)

    def split_batch(_module, args, kwargs):
        named = dict(signature.bind(*args, **kwargs).arguments)  # every input by name
        batch = named["hidden_states"].shape[0]
        state["split"] = batch % world == 0
        if not state["split"]:
            return None
        chunk = batch // world

        def mine(x):
            if torch.is_tensor(x) and x.dim() > 0 and x.shape[0] == batch:
                return x.narrow(0, rank * chunk, chunk)
            return x

        for name in _BATCHED_INPUTS:
            if name in named:
                named[name] = mine(named[name])
        return (), named

    def gather_batch(_module, _args, output):
        if not state["split"]:
            return output
        sample = output[0] if isinstance(output, tuple) else output.sample
        parts = [torch.empty_like(sample) for _ in range(world)]
        dist.all_gather(parts, sample.contiguous(), group=group)
        full = torch.cat(parts, dim=0)
        if isinstance(output, tuple):
            return (full, *output[1:])
        output.sample = full
        return output

    transformer.register_forward_pre_hook(split_batch, with_kwargs=True)
    transformer.register_forward_hook(gather_batch)
    return transformer
