"""Ulysses sequence parallelism for ``WanTransformer3DModel`` with DeepSpeed's ``DistributedAttention``.

Every rank of a Ulysses group holds the whole (or, with TP, its TP shard of the) transformer and
a contiguous slice of the video tokens.  Everything in a Wan block is per token except
self-attention, so only ``attn1`` communicates: DeepSpeed's ``DistributedAttention`` all-to-alls
q/k/v from "my tokens, all my heads" to "all tokens, heads/U of my heads", runs the local
attention, and all-to-alls the result back.  The cut points are the ones diffusers' own
``WanTransformer3DModel._cp_plan`` uses:

* the rotary tables (``rope`` output) and the first block's ``hidden_states`` are split along the
  sequence, so each shard's q/k are rotated with *their own positions* before the all-to-all;
* ``proj_out``'s output is all-gathered back to the full sequence.

Wan's q/k RMSNorm normalises each token over all heads: a rank holds every head of its tokens
(or, with TP, its TP shard plus the TP all-reduce of :class:`~.tensor_parallel.DistributedRMSNorm`),
so the norm runs before the all-to-all, unchanged.  Cross-attention (``attn2``) keys come from the
text, which every rank holds whole: it stays local, queries from the rank's own tokens.

A token count that does not divide by U is padded at the end; padded keys are masked out of
self-attention and padded rows dropped at the gather (production sizes need no padding: 480p's
32,760 and 720p's 75,600 tokens divide by 8).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = ["SequenceShard", "UlyssesAttnProcessor", "apply_ulysses"]


class SequenceShard:
    """This rank's slice of the token sequence in a Ulysses group (state of the current forward)."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.full_len: int | None = None
        self.padded_len: int | None = None

    def reset(self) -> None:
        """Forget the previous forward's lengths (a forward that raised leaves them set)."""
        self.full_len = self.padded_len = None

    def split(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Pad ``x`` along ``dim`` to a multiple of the group size and keep this rank's slice."""
        length = x.shape[dim]
        padded = -(-length // self.world) * self.world
        if self.full_len is not None and self.full_len != length:
            raise RuntimeError(f"sequence length changed within a forward: {self.full_len} -> {length}")
        self.full_len, self.padded_len = length, padded
        if padded != length:
            pad_shape = list(x.shape)
            pad_shape[dim] = padded - length
            x = torch.cat([x, x.new_zeros(pad_shape)], dim=dim)
        chunk = padded // self.world
        return x.narrow(dim, self.rank * chunk, chunk).contiguous()

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """All shards concatenated along ``dim``, padding removed."""
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim).narrow(dim, 0, self.full_len)

    def key_mask(self, device: torch.device) -> torch.Tensor | None:
        """Boolean ``(1, 1, 1, padded_len)`` mask hiding padded keys (None without padding)."""
        if self.padded_len == self.full_len:
            return None
        mask = torch.zeros(self.padded_len, dtype=torch.bool, device=device)
        mask[: self.full_len] = True
        return mask.view(1, 1, 1, -1)


def _apply_rotary_emb(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    # Wan's interleaved rotary embedding, as diffusers' WanAttnProcessor applies it.
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class UlyssesAttnProcessor:
    """Wan self-attention (``attn1``) over a Ulysses group: diffusers' ``WanAttnProcessor`` with the
    attention call wrapped in DeepSpeed's ``DistributedAttention``.

    ``_attention_backend`` is read like diffusers' processors read it, so
    ``transformer.set_attention_backend(...)`` chooses the kernel of the local attention.
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self, shard: SequenceShard):
        from deepspeed.sequence.layer import DistributedAttention

        self.shard = shard
        # Tensors are (batch, seq, heads, head_dim): scatter heads (2), gather the sequence (1).
        self.attention = DistributedAttention(self._local_attention, shard.group, scatter_idx=2, gather_idx=1)

    def _local_attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        return dispatch_attention_fn(query, key, value, attn_mask=self.shard.key_mask(query.device),
                                     dropout_p=0.0, is_causal=False, backend=self._attention_backend)

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("UlyssesAttnProcessor is for Wan's self-attention (attn1) only")
        from diffusers.models.transformers.transformer_wan import _get_qkv_projections

        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:  # this shard's positions (the rope output was split alike)
            query = _apply_rotary_emb(query, *rotary_emb)
            key = _apply_rotary_emb(key, *rotary_emb)
        out = self.attention(query, key, value, 0)  # batch_dim_idx=0
        out = out.flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


def apply_ulysses(transformer: torch.nn.Module, group: dist.ProcessGroup) -> torch.nn.Module:
    """Run ``transformer`` (a ``WanTransformer3DModel``, TP-sharded or not) sequence-parallel over
    ``group``, in place; every rank of the group must call it, then call the model with the same
    inputs.  The heads each rank holds must divide by the group size.  Returns the transformer.
    """
    shard = SequenceShard(group)
    for i, block in enumerate(transformer.blocks):
        if block.attn1.heads % shard.world:
            raise ValueError(f"blocks.{i}.attn1: {block.attn1.heads} heads on this rank do not divide by "
                             f"the Ulysses degree {shard.world}")
        block.attn1.set_processor(UlyssesAttnProcessor(shard))

    def split_rope(_module, _args, output):
        freqs_cos, freqs_sin = output  # (1, seq, 1, head_dim) each
        return shard.split(freqs_cos, 1), shard.split(freqs_sin, 1)

    def split_hidden_states(_module, args, kwargs):
        if args:
            return (shard.split(args[0], 1), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": shard.split(kwargs["hidden_states"], 1)}

    def gather_output(_module, _args, output):
        return shard.gather(output, 1)

    transformer.register_forward_pre_hook(lambda *_: shard.reset())
    transformer.rope.register_forward_hook(split_rope)
    transformer.blocks[0].register_forward_pre_hook(split_hidden_states, with_kwargs=True)
    transformer.proj_out.register_forward_hook(gather_output)
    transformer._ulysses_shard = shard  # informational
    return transformer
