"""The real Wan 2.1 architectures: exact sizes and FLOPs on the meta device, random weights built
directly in the target dtype, laid out exactly as `from_pretrained` lays out a checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from vidgen_serve.config import AppConfig
from vidgen_serve.models.architectures import ARCHITECTURES, WAN21_1_3B, WAN21_14B, meta_model
from vidgen_serve.models.flops import transformer_flops
from vidgen_serve.models.loading import load_text_encoder, load_transformer, load_vae, resolve_checkpoint

# /work/shared/GPU.md: parameters of the public configs; TFLOP per CFG step (batch 2) measured on an H100.
PARAMS = {(WAN21_1_3B, "transformer"): 1_418_996_800, (WAN21_14B, "transformer"): 14_288_491_584,
          (WAN21_1_3B, "vae"): 126_892_531}
LATENT_480P = (21, 60, 104)  # 81 frames of 832x480: 32,760 tokens
LATENT_720P = (21, 90, 160)  # 81 frames of 1280x720: 75,600 tokens


@pytest.mark.parametrize("key", list(PARAMS), ids=lambda k: f"{k[0].split('/')[1]}-{k[1]}")
def test_parameter_counts_on_meta(key):
    model = meta_model(*key)
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == PARAMS[key]


def test_umt5_xxl_encoder():
    model = meta_model(WAN21_14B, "text_encoder")
    assert model.shared.weight.shape == (256384, 4096)
    assert len(model.encoder.block) == 24
    assert 5.6e9 < sum(p.numel() for p in model.parameters()) < 5.7e9  # UMT5-XXL encoder: 5.68 B


@pytest.mark.parametrize(
    "checkpoint,latent,tflop,attention_share",
    [(WAN21_1_3B, LATENT_480P, 566, 0.71), (WAN21_1_3B, LATENT_720P, 2500, 0.85), (WAN21_14B, LATENT_480P, 3357, 0.53)],
    ids=["1.3B-480p", "1.3B-720p", "14B-480p"],
)
def test_flops_per_cfg_step(checkpoint, latent, tflop, attention_share):
    flops = transformer_flops(ARCHITECTURES[checkpoint]["transformer"], *latent, batch=2)
    assert flops["total"] / 1e12 == pytest.approx(tflop, rel=0.02)
    assert flops["attention"] / flops["total"] == pytest.approx(attention_share, abs=0.02)



def test_a_step_without_cfg_is_half_the_work():
    config = ARCHITECTURES[WAN21_1_3B]["transformer"]
    small = (5, 30, 52)
    assert transformer_flops(config, *small, batch=1)["total"] == pytest.approx(
        transformer_flops(config, *small, batch=2)["total"] / 2, rel=1e-9)


def test_config_checkpoint_for_a_builtin_architecture(tmp_path):
    config = AppConfig(profile="wan2.1-1.3b", profile_overrides={"weights": "random", "device": "cpu"},
                       cache_dir=tmp_path)
    path = resolve_checkpoint(config)
    assert path.startswith(str(tmp_path))
    from diffusers import WanTransformer3DModel

    loaded = WanTransformer3DModel.load_config(path, subfolder="transformer")
    for key, value in ARCHITECTURES[WAN21_1_3B]["transformer"].items():
        assert loaded[key] == (list(value) if isinstance(value, tuple) else value), key
    index = json.loads((tmp_path / path.split("/")[-1] / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "UniPCMultistepScheduler"]
    assert not list((tmp_path / path.split("/")[-1]).rglob("*.safetensors"))  # configs only
    assert resolve_checkpoint(config) == path  # built once


def _layout(model) -> dict:
    return {name: (t.dtype, t.device.type, tuple(t.shape))
            for name, t in [*model.named_parameters(), *model.named_buffers()]}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_random_weights_have_the_checkpoint_layout(checkpoint, dtype):
    """Same names, shapes, dtypes (float32 kept where diffusers keeps it) and devices as from_pretrained."""
    loaded = AppConfig(profile_overrides={"dtype": dtype, "vae_dtype": dtype}).model_profile
    random = loaded.model_copy(update={"weights": "random"})
    cpu = torch.device("cpu")
    for load in (load_transformer, load_text_encoder, load_vae):
        reference, built = load(checkpoint, loaded, cpu), load(checkpoint, random, cpu)
        assert _layout(built) == _layout(reference), load.__name__
        assert built.dtype == reference.dtype == getattr(torch, dtype)
        assert all(torch.isfinite(p).all() for p in built.parameters())
        assert all(p.float().std() > 0 for name, p in built.named_parameters()
                   if name.endswith("weight") and p.dim() >= 2), load.__name__
    transformer = load_transformer(checkpoint, random, cpu)
    assert transformer.scale_shift_table.dtype == torch.float32  # diffusers keeps it in float32
    assert transformer.blocks[0].attn1.to_q.weight.dtype == getattr(torch, dtype)
    encoder = load_text_encoder(checkpoint, random, cpu)
    assert encoder.shared.weight is encoder.encoder.embed_tokens.weight  # tied as after loading
    # Deterministic: the same seed gives the same weights.
    again = load_transformer(checkpoint, random, cpu)
    assert torch.equal(transformer.blocks[1].ffn.net[2].weight, again.blocks[1].ffn.net[2].weight)


@pytest.mark.slow
def test_random_build_allocates_no_float32_copy():
    """Peak memory of building a bf16 model is its bf16 size, not a float32 model cast down."""
    script = textwrap.dedent("""
        import json, resource, torch
        from diffusers import WanTransformer3DModel
        from vidgen_serve.models.architectures import ARCHITECTURES, WAN21_1_3B, build_random
        config = {**ARCHITECTURES[WAN21_1_3B]["transformer"], "num_layers": 6}
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        model = build_random(lambda: WanTransformer3DModel.from_config(config), "cpu", torch.bfloat16)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        print(json.dumps({"growth": peak - before, "size": size,
                          "params": sum(p.numel() for p in model.parameters())}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["params"] > 250e6
    assert result["size"] < 1.1 * result["params"] * 2  # bf16, a few float32 modules
    # A float32 build cast to bf16 would peak at >= 3x the bf16 size (fp32 copy + bf16 copy).
    assert result["growth"] < 1.5 * result["size"], result
