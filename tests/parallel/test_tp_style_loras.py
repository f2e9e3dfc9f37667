"""Style LoRA adapters on a parallel denoiser (2 gloo ranks, tiny checkpoint, CPU).

Every rank runs the real `ParallelWorker`: DeepSpeed TP=2 shards (the adapter's factors are
sliced per shard, and row-parallel linears all-reduce the LoRA's low-rank product), Ulysses=2 or
CFG=2 (whole linears: peft layers on every rank; CFG splits the batch between the ranks). The same
sequence of styles runs in-process on one `Denoiser` (peft layers through diffusers' loader):
the TP latents must match it, and a plain style after LoRA styles must give the plain output.
"""

from __future__ import annotations

import os

import pytest
import torch

from vidgen_serve.config import AppConfig
from vidgen_serve.pipeline.denoiser import Denoiser
from vidgen_serve.plan import build_plan
from vidgen_serve.request import parse_request

SEQUENCE = ("realistic", "ink-wash", "cinematic", "ink-wash", "realistic")
LATENT_ATOL = 1e-5  # float32: summation order differs between shards


def _plan(config: AppConfig, style: str):
    body = {"prompt": "a red kite over a lake", "style": style, "duration": 1, "resolution": "480p",
            "aspect": "1:1", "seed": 5, "num_inference_steps": 2}
    return build_plan(parse_request(body), config)


def _styles_worker(rank, world_size, overrides, plans, embeddings):
    """One rank: a `ParallelWorker` of the layout, a whole generation per plan; rank 0's latents and stats."""
    from vidgen_serve.parallel.worker import ParallelWorker

    worker = ParallelWorker(rank, world_size, AppConfig(profile_overrides=overrides), max_styles=2)
    worker.setup(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))
    batches = set()  # batch sizes the last block sees on this rank (CFG=2: each rank its half)
    worker.denoiser.transformer.blocks[-1].register_forward_pre_hook(lambda _m, args: batches.add(args[0].shape[0]))
    out = []
    for i, plan in enumerate(plans):
        info = worker.start(plan, embeddings, run_id=i)
        assert "error" not in info, info
        for _ in range(info["steps"] * info["windows"]):
            worker.advance(i)
        out.append(worker.latents(i))
    return {"latents": out, "stats": worker.style_stats(), "block_batches": sorted(batches),
            "sharded": type(getattr(worker.denoiser.transformer.blocks[0].attn1.to_out[0], "base_layer",
                                    worker.denoiser.transformer.blocks[0].attn1.to_out[0])).__name__}


@pytest.fixture(scope="module")
def expected(tiny_config, checkpoint, pipeline):
    plans = [_plan(tiny_config, style) for style in SEQUENCE]
    embeddings = pipeline.text_encoder.encode(plans[0])  # one conditioning: only the adapter differs
    local = Denoiser(tiny_config, checkpoint, max_styles=2)
    return plans, embeddings, [local.denoise(plan, embeddings) for plan in plans]


@pytest.mark.parametrize("overrides,linear,batch", [
    ({"tensor_parallel_size": 2}, "LinearAllreduce", 2),  # sharded linears: per-rank slices of the factors
    ({"parallel": {"ulysses": 2}}, "Linear", 2),  # whole linears on every rank: peft layers, as in one process
    ({"parallel": {"cfg": 2}}, "Linear", 1),  # peft layers on every rank, each running one half of the CFG batch
], ids=["tp2", "ulysses2", "cfg2"])
def test_parallel_with_adapters_matches_one_process(rank_pool, expected, overrides, linear, batch):
    plans, embeddings, expected = expected
    assert all(plan.guidance_scale > 1.0 for plan in plans)  # a CFG batch of 2 (cond, uncond) to split
    result = rank_pool().run(_styles_worker, 2, overrides, plans, embeddings, timeout=600)
    assert result["sharded"] == linear  # (TP: the row-parallel path was really exercised)
    assert result["block_batches"] == [batch]  # (CFG: each rank really ran its half of the batch)
    tp = result["latents"]
    for style, ours, ref in zip(SEQUENCE, tp, expected):
        assert (ours - ref).abs().max().item() <= LATENT_ATOL, style
    # The adapters change the output; switching back to the plain style restores it exactly.
    assert (tp[1] - tp[0]).abs().mean() > 0.05 and (tp[2] - tp[1]).abs().mean() > 0.05
    assert torch.equal(tp[4], tp[0]) and torch.equal(tp[3], tp[1])
    stats = result["stats"]
    assert stats["loaded"] == ["cinematic", "ink-wash"] and stats["loads"] == 2
