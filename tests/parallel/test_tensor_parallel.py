"""Tensor-parallel sharding of the tiny Wan transformer, on real 2-rank gloo groups.

No mocks: every group test runs on local rank processes (the shared ``rank_pool``) that form a
gloo group and shard with DeepSpeed's ``init_inference``.  One group run (module fixture) feeds
the equivalence, parameter-count and "distributed RMSNorm is required" tests to keep the file
fast; the harness's failure reporting is tested on one-shot groups of their own.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

from rank_pool import run_local_tp_group

from vidgen_serve.models.tiny import TRANSFORMER_CONFIG
from vidgen_serve.parallel import DistributedRMSNorm, parameter_bytes, shard_wan_transformer

TINY_CONFIG = TRANSFORMER_CONFIG  # exactly the tiny profile's transformer


def _tiny_transformer(seed: int = 0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(**TINY_CONFIG).eval()


def _inputs(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(1, 16, 3, 8, 8, generator=g),
        timestep=torch.tensor([637]),
        encoder_hidden_states=torch.randn(1, 16, 32, generator=g),
    )


def _linear_params(module: torch.nn.Module) -> int:
    return sum(m.weight.numel() for m in module.blocks.modules()
               if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2)


# --- workers (module level so spawn can pickle them) ------------------------------------------


def _shard_and_compare_worker(rank, world_size, state_dict, inputs):
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(**TINY_CONFIG)
    model.load_state_dict(state_dict)
    model = shard_wan_transformer(model.eval(), world_size, dtype=torch.float32)

    norms = {name: m for name, m in model.named_modules() if isinstance(m, DistributedRMSNorm)}
    with torch.inference_mode():
        out = model(**inputs, return_dict=False)[0]

    # The same sharded model with naive per-shard norms (RMSNorm over the local width only).
    for name, dnorm in norms.items():
        parent_name, attr = name.rsplit(".", 1)
        naive = torch.nn.RMSNorm(dnorm.local_width, eps=dnorm.eps)
        with torch.no_grad():
            naive.weight.copy_(dnorm.weight)
        setattr(model.get_submodule(parent_name), attr, naive)
    with torch.inference_mode():
        naive_out = model(**inputs, return_dict=False)[0]

    return {
        "output": out.clone(),
        "naive_output": naive_out.clone(),
        "linear_params": _linear_params(model),
        "param_bytes": parameter_bytes(model),
        "heads": [(b.attn1.heads, b.attn2.heads) for b in model.blocks],
        "norm_names": sorted(norms),
        "norm_weights": {n: m.weight.detach().clone() for n, m in norms.items()},
        "rank": rank,
    }


def _failing_worker(rank, world_size):
    import torch.distributed as dist

    if rank == 1:
        raise ValueError("rank 1 exploded on purpose")
    dist.barrier()  # rank 0 would wait here forever without the parent's handling
    return "unreachable"


def _crashing_worker(rank, world_size):
    import torch.distributed as dist

    if rank == 1:
        os._exit(3)  # dies without reporting, like a segfault
    dist.barrier()
    return "unreachable"


def _ok_worker(rank, world_size, x):
    import torch.distributed as dist

    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return {"rank": rank, "sum": t.item(), "x": x}


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference():
    model = _tiny_transformer()
    inputs = _inputs()
    with torch.inference_mode():
        out = model(**inputs, return_dict=False)[0]
    state_dict = {k: v.clone() for k, v in model.state_dict().items()}
    return model, state_dict, inputs, out


@pytest.fixture(scope="module")
def sharded(reference, rank_pool):
    _, state_dict, inputs, _ = reference
    return rank_pool().run(_shard_and_compare_worker, 2, state_dict, inputs, timeout=240)


# --- tests ------------------------------------------------------------------------------------


def test_sharded_forward_matches_unsharded(reference, sharded):
    _, _, _, ref_out = reference
    assert sharded["rank"] == 0
    assert sharded["output"].shape == ref_out.shape
    diff = (sharded["output"] - ref_out).abs().max().item()
    assert diff <= 1e-5, f"TP=2 forward differs from unsharded by {diff}"
    # Each rank attends with half of the heads.
    assert sharded["heads"] == [(2, 2), (2, 2)]


def test_norm_weights_are_rank0_slice(reference, sharded):
    _, state_dict, _, _ = reference
    # attn1/attn2 norm_q/norm_k of both blocks were replaced; rank 0 holds the first half.
    assert len(sharded["norm_names"]) == 8
    for name, w in sharded["norm_weights"].items():
        full = state_dict[name + ".weight"]
        assert w.shape[0] * 2 == full.shape[0]
        assert torch.equal(w, full[: w.shape[0]])


def test_sharded_parameters_are_about_half(reference, sharded):
    model, _, _, _ = reference
    full_linear = _linear_params(model)
    assert sharded["linear_params"] * 2 == full_linear
    full_bytes = parameter_bytes(model)
    assert sharded["param_bytes"] < 0.8 * full_bytes


def test_distributed_rmsnorm_is_required(reference, sharded):
    _, _, _, ref_out = reference
    naive_diff = (sharded["naive_output"] - ref_out).abs().max().item()
    assert naive_diff > 1e-3, f"a per-shard norm should be visibly wrong, diff={naive_diff}"


def test_distributed_rmsnorm_single_process_matches_rmsnorm():
    torch.manual_seed(0)
    ref = torch.nn.RMSNorm(48, eps=1e-6)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 7, 48)
    dnorm = DistributedRMSNorm(ref.weight, full_width=48, eps=1e-6)
    torch.testing.assert_close(dnorm(x), ref(x), atol=1e-6, rtol=1e-6)
    # The full width enters the mean even when only a shard is present locally.
    shard = DistributedRMSNorm(ref.weight[:24], full_width=48, eps=1e-6)
    xs = x[..., :24]
    expected = xs * torch.rsqrt(xs.pow(2).sum(-1, keepdim=True) / 48 + 1e-6) * ref.weight[:24]
    torch.testing.assert_close(shard(xs), expected, atol=1e-6, rtol=1e-6)


def test_heads_not_divisible_raises():
    model = _tiny_transformer()
    with pytest.raises(ValueError, match="heads"):
        shard_wan_transformer(model, 3)


def test_tp1_keeps_fp32_modules():
    model = _tiny_transformer()
    out = shard_wan_transformer(model, 1, dtype=torch.bfloat16)
    assert out.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert out.blocks[0].scale_shift_table.dtype == torch.float32


def test_rank_pool_returns_rank0_result_and_reuses_processes(rank_pool):
    pool = rank_pool()
    assert pool.run(_ok_worker, 2, "payload", timeout=120) == {"rank": 0, "sum": 3.0, "x": "payload"}
    # The same processes form a group of another size next: 1 + 2 + 3 + 4.
    assert pool.run(_ok_worker, 4, "again", timeout=120) == {"rank": 0, "sum": 10.0, "x": "again"}


def test_failing_rank_raises_quickly():
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="rank 1.*exploded on purpose"):
        run_local_tp_group(_failing_worker, 2, timeout=120)
    assert time.monotonic() - t0 < 60


def test_crashed_rank_raises_quickly():
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="rank 1/2 exited with code 3"):
        run_local_tp_group(_crashing_worker, 2, timeout=120)
    assert time.monotonic() - t0 < 60
