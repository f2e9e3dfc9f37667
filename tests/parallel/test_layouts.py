"""Parallel layouts of the denoiser's worker group against one rank, on CPU (gloo).

Every case runs the real rank worker (`ParallelWorker`: process group, `{tp, ulysses, cfg}`
sub-groups, sliced checkpoint load, DeepSpeed TP, DeepSpeed `DistributedAttention`, CFG
hooks) over a whole 2-step generation of the tiny checkpoint, on the shared pool of rank
processes, and compares its latents with the in-process single-rank `Denoiser`.  The plan is
1:1 (25 tokens per latent frame, 75 per window), so Ulysses at 2 and 4 ranks also exercises the
padding of a token count that does not divide.

The host-memory test loads a widened tiny-architecture checkpoint with TP=2 and TP=4 and
measures each rank's peak resident-memory growth (`rank_pool.peak_rss_growth`).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from vidgen_serve.config import AppConfig
from vidgen_serve.models.tiny import TRANSFORMER_CONFIG
from vidgen_serve.plan import build_plan
from vidgen_serve.request import parse_request

PROMPT = "a red kite over a lake, no birds"
LATENT_ATOL = 1e-4  # float32: summation order differs between layouts
BF16_REL = 3e-2  # bfloat16 TP=2 vs TP=1: max |diff| / max |reference|
TOKENS = 75  # per window of the plan below: 3 latent frames x (80/16) x (80/16)


def _plan(config: AppConfig, guidance_scale: float = 5.0):
    body = {"prompt": PROMPT, "duration": 1, "resolution": "480p", "aspect": "1:1", "seed": 11,
            "num_inference_steps": 2, "guidance_scale": guidance_scale}
    return build_plan(parse_request(body), config)


# --- rank functions (module level: the pool pickles them by name) ------------------------------


def _generate_worker(rank, world_size, overrides, plan, embeddings):
    """One rank: a `ParallelWorker` for `overrides`, a whole generation; rank 0's latents."""
    from vidgen_serve.parallel.worker import ParallelWorker

    worker = ParallelWorker(rank, world_size, AppConfig(profile_overrides=overrides))
    worker.setup(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))
    transformer = worker.denoiser.transformer
    seen = []  # (batch, tokens) of the hidden states the last block gets on this rank
    transformer.blocks[-1].register_forward_pre_hook(lambda _m, args: seen.append(tuple(args[0].shape[:2])))
    info = worker.start(plan, embeddings, run_id="case")
    for _ in range(info["steps"] * info["windows"]):
        worker.advance("case")
    return {
        "latents": worker.latents("case"),
        "info": worker.info(),
        "linear_dtype": transformer.blocks[0].attn1.to_q.weight.dtype,
        "table_dtype": transformer.scale_shift_table.dtype,
        "heads": transformer.blocks[0].attn1.heads,
        "self_attention": type(transformer.blocks[0].attn1.processor).__name__,
        "block_inputs": sorted(set(seen)),
    }


def _load_memory_worker(rank, world_size, checkpoint, mode):
    """Peak RSS growth of loading the transformer for TP=world_size, gathered from every rank.

    mode "sliced": `load_parallel_transformer` (meta model, DeepSpeed shards shapes, each rank
    reads its slices); mode "whole": the previous way, `from_pretrained` of the whole
    transformer on every rank, then DeepSpeed shards it.
    """
    import torch.distributed as dist

    import deepspeed.inference.engine  # noqa: F401 - DeepSpeed's lazily imported modules
    import deepspeed.module_inject.auto_tp  # noqa: F401
    import deepspeed.module_inject.replace_module  # noqa: F401
    from rank_pool import peak_rss_growth

    from vidgen_serve.models.loading import load_transformer
    from vidgen_serve.parallel.process_group import build_parallel_groups
    from vidgen_serve.parallel.tensor_parallel import parameter_bytes, shard_wan_transformer
    from vidgen_serve.parallel.transformer import build_empty_transformer, load_parallel_transformer

    profile = AppConfig(profile_overrides={"checkpoint": str(checkpoint),
                                           "parallel": {"tp": world_size}}).model_profile
    groups = build_parallel_groups(profile.parallel)
    # The first model construction imports most of diffusers (~200 MB resident, the same for any
    # model size): do it once, weightless, so the measurement sees what the load itself holds.
    build_empty_transformer(str(checkpoint), torch.float32)
    if mode == "sliced":
        growth, model = peak_rss_growth(
            lambda: load_parallel_transformer(str(checkpoint), profile, groups, torch.device("cpu")))
    else:
        growth, model = peak_rss_growth(
            lambda: shard_wan_transformer(load_transformer(str(checkpoint), profile, None), world_size,
                                          dtype=torch.float32, tp_group=groups.tp_group))
    per_rank = [None] * world_size
    dist.all_gather_object(per_rank, {"growth": growth, "held": parameter_bytes(model)})
    return per_rank


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prompts(pipeline, tiny_config):
    """Plans and embeddings for guidance 5 (CFG batch of 2) and guidance 1 (one pass)."""
    out = {}
    for scale in (5.0, 1.0):
        plan = _plan(tiny_config, scale)
        out[scale] = (plan, pipeline.text_encoder.encode(plan))
    return out


@pytest.fixture(scope="module")
def reference(pipeline, prompts, checkpoint):
    """Single-rank latents: float32 (the session pipeline's Denoiser) and bfloat16, per guidance."""
    from vidgen_serve.pipeline.denoiser import Denoiser

    bf16 = Denoiser(AppConfig(profile_overrides={"dtype": "bfloat16"}), checkpoint)
    refs = {}
    for scale, (plan, emb) in prompts.items():
        refs[("float32", scale)] = pipeline.denoiser.denoise(plan, emb)
    plan, emb = prompts[5.0]
    refs[("bfloat16", 5.0)] = bf16.denoise(plan, emb)
    return refs


@pytest.fixture(scope="module")
def wide_checkpoint(tmp_path_factory):
    """The tiny architecture widened to ~200 MB (heads 4 x 128, ffn 4096, 8 layers), float32.

    The tiny checkpoint itself (368 KB) is far below what a resident-set measurement of a
    Python process can resolve; the same classes at this width make the load dominate.
    """
    from diffusers import WanTransformer3DModel

    root = tmp_path_factory.mktemp("wide-checkpoint")
    torch.manual_seed(0)
    config = {**TRANSFORMER_CONFIG, "attention_head_dim": 128, "ffn_dim": 4096, "num_layers": 8}
    WanTransformer3DModel(**config).save_pretrained(root / "transformer")
    size = sum(f.stat().st_size for f in (root / "transformer").glob("*.safetensors"))
    return root, size


# --- the layout in the profile (no workers) ---------------------------------------------------


def test_parallel_layout_in_profiles_and_overrides():
    from pydantic import ValidationError

    from vidgen_serve.config import PROFILES
    from vidgen_serve.serve import deployment_defaults
    from vidgen_serve.serving.settings import ServeSettings

    assert PROFILES["wan2.1-14b-tp8"].parallel.model_dump() == {"tp": 8, "ulysses": 1, "cfg": 1}
    assert PROFILES["wan2.1-14b-8gpu"].parallel.model_dump() == {"tp": 1, "ulysses": 4, "cfg": 2}
    assert PROFILES["wan2.1-14b-8gpu"].parallel.size == 8
    # tensor_parallel_size is the short form of parallel.tp, as an override too (replacing the layout).
    tp4 = AppConfig(profile="wan2.1-14b-8gpu", profile_overrides={"tensor_parallel_size": 4}).model_profile
    assert (tp4.parallel.model_dump(), tp4.tensor_parallel_size) == ({"tp": 4, "ulysses": 1, "cfg": 1}, 4)
    u8 = AppConfig(profile="wan2.1-14b-tp8", profile_overrides={"parallel": {"ulysses": 8}}).model_profile
    assert u8.parallel.model_dump() == {"tp": 1, "ulysses": 8, "cfg": 1} and u8.tensor_parallel_size == 1
    both = AppConfig(profile_overrides={"parallel": {"cfg": 2}, "tensor_parallel_size": 2}).model_profile
    assert both.parallel.model_dump() == {"tp": 2, "ulysses": 1, "cfg": 2}
    with pytest.raises(ValidationError, match="tensor_parallel_size=4 conflicts with parallel.tp=2"):
        AppConfig(profile_overrides={"parallel": {"tp": 2}, "tensor_parallel_size": 4})
    with pytest.raises(ValidationError, match=r"parallel\.cfg"):
        AppConfig(profile_overrides={"parallel": {"cfg": 4}})
    # A non-TP layout is a worker group too: one bundle per rank behind the replica's.
    settings = ServeSettings.model_validate({"model": {"profile_overrides": {"parallel": {"ulysses": 2, "cfg": 2}}}})
    denoiser = deployment_defaults(settings)["Denoiser"]
    assert denoiser["placement_group_bundles"] == [{"CPU": 0.1}] + [{"CPU": 0.25}] * 4
    assert denoiser["placement_group_strategy"] == "STRICT_PACK"


# --- host memory ------------------------------------------------------------------------------


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_group_load_peak_host_memory_within_1_5x_checkpoint(rank_pool, wide_checkpoint, tp):
    root, size = wide_checkpoint
    per_rank = rank_pool().run(_load_memory_worker, tp, root, "sliced", timeout=300)
    node_peak = sum(r["growth"] for r in per_rank)  # >= the node's peak (peaks need not coincide)
    held = sum(r["held"] for r in per_rank)
    print(f"TP={tp}: checkpoint {size / 2**20:.1f} MiB; per-rank peak growth "
          f"{[round(r['growth'] / 2**20, 1) for r in per_rank]} MiB; sum {node_peak / size:.2f}x the "
          f"checkpoint; parameters held {held / size:.2f}x")
    # Each rank holds its shard plus the replicated tensors: together a little over one copy.
    assert held < 1.25 * size
    assert node_peak <= 1.5 * size, f"TP={tp} load peaks at {node_peak / size:.2f}x the checkpoint"


def test_whole_transformer_per_rank_would_fail_the_memory_bound(rank_pool, wide_checkpoint):
    """The measurement catches the previous load (every rank reads the whole transformer)."""
    root, size = wide_checkpoint
    per_rank = rank_pool().run(_load_memory_worker, 2, root, "whole", timeout=300)
    node_peak = sum(r["growth"] for r in per_rank)
    print(f"whole transformer per rank, TP=2: sum of peaks {node_peak / size:.2f}x the checkpoint")
    assert node_peak > 1.5 * size


# --- layouts against one rank -----------------------------------------------------------------

LAYOUTS = [
    # (id, profile overrides, ranks, reference dtype)
    ("tp2-bf16", {"parallel": {"tp": 2}, "dtype": "bfloat16"}, 2, "bfloat16"),
    ("cfg2", {"parallel": {"cfg": 2}}, 2, "float32"),
    ("ulysses2", {"parallel": {"ulysses": 2}}, 2, "float32"),
    ("ulysses4", {"parallel": {"ulysses": 4}}, 4, "float32"),
    ("tp2-cfg2", {"parallel": {"tp": 2, "cfg": 2}}, 4, "float32"),
    ("ulysses2-cfg2", {"parallel": {"ulysses": 2, "cfg": 2}}, 4, "float32"),
    ("tp2-ulysses2", {"parallel": {"tp": 2, "ulysses": 2}}, 4, "float32"),
]


@pytest.mark.parametrize("overrides, ranks, dtype", [case[1:] for case in LAYOUTS], ids=[c[0] for c in LAYOUTS])
def test_layout_generation_matches_one_rank(rank_pool, prompts, reference, overrides, ranks, dtype):
    plan, emb = prompts[5.0]
    out = rank_pool().run(_generate_worker, ranks, overrides, plan, emb, timeout=300)
    ref = reference[(dtype, 5.0)]
    layout = AppConfig(profile_overrides=overrides).model_profile.parallel
    assert out["info"]["world_size"] == ranks and out["info"]["coords"] == {"tp": 0, "ulysses": 0, "cfg": 0}
    assert out["heads"] == 4 // layout.tp  # TP's share; Ulysses' all-to-all splits them again in attention
    assert (out["self_attention"] == "UlyssesAttnProcessor") == (layout.ulysses > 1)
    # Each rank's blocks see its CFG half of the batch and its slice of the 75 tokens (padded to
    # a multiple of the Ulysses degree): the work really is split.
    tokens = -(-TOKENS // layout.ulysses)
    assert out["block_inputs"] == [(2 // layout.cfg, tokens)], out["block_inputs"]
    assert out["latents"].shape == ref.shape and out["latents"].dtype == torch.float32
    diff = (out["latents"] - ref).abs().max().item()
    if dtype == "bfloat16":
        assert out["linear_dtype"] == torch.bfloat16 and out["table_dtype"] == torch.float32
        rel = diff / ref.abs().max().item()
        print(f"{overrides}: bf16 latents vs one bf16 rank: max |diff| {diff:.3g}, relative {rel:.3g}")
        assert rel <= BF16_REL, f"{overrides}: bf16 latents differ from one rank by {rel:.3g} (relative)"
    else:
        assert diff <= LATENT_ATOL, f"{overrides}: latents differ from one rank by {diff:.3g}"


def test_cfg2_with_guidance_1_runs_one_pass_per_rank(rank_pool, prompts, reference):
    """Without an unconditional pass there is nothing to split: both ranks run the same pass."""
    plan, emb = prompts[1.0]
    out = rank_pool().run(_generate_worker, 2, {"parallel": {"cfg": 2}}, plan, emb, timeout=300)
    diff = (out["latents"] - reference[("float32", 1.0)]).abs().max().item()
    assert diff <= LATENT_ATOL
    # ...and guidance 1 is really a different generation from guidance 5.
    assert (reference[("float32", 1.0)] - reference[("float32", 5.0)]).abs().max().item() > 1e-2


def test_keyframed_windows_match_one_rank(rank_pool, pipeline, tiny_config):
    """Every rank's `DenoiseRun` conditions each window on its blend of prompts (a keyframe at 6 s of
    12: three windows, the middle one across the change), as one rank does."""
    body = {"prompt": PROMPT, "duration": 12, "resolution": "480p", "aspect": "1:1", "seed": 11,
            "num_inference_steps": 2, "keyframes": [{"time_s": 6, "prompt": "a green meadow at dawn"}]}
    plan = build_plan(parse_request(body), tiny_config)
    assert [len(w.prompt_weights) for w in plan.windows] == [1, 2, 1] and len(plan.prompts) == 2
    emb = pipeline.text_encoder.encode(plan)
    ref = pipeline.denoiser.denoise(plan, emb)
    out = rank_pool().run(_generate_worker, 2, {"parallel": {"tp": 2}}, plan, emb, timeout=300)
    diff = (out["latents"] - ref).abs().max().item()
    assert diff <= LATENT_ATOL, f"keyframed TP=2 latents differ from one rank by {diff:.3g}"
