"""Speed options on the tiny model in bfloat16, each against the plain path: attention backend,
step caching (off = bit-identical), int8 weights (torchao), VAE tiling. Regional compilation is
checked by `benchmarks/gpu_check.py --cpu-smoke` (tests/test_gpu_check.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vidgen_serve.config import AppConfig
from vidgen_serve.plan import build_plan
from vidgen_serve.request import VideoRequest

BF16 = {"dtype": "bfloat16"}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def config():
    return AppConfig(profile_overrides=BF16)


@pytest.fixture(scope="module")
def text_encoder(config, checkpoint):
    from vidgen_serve.pipeline import TextEncoder

    return TextEncoder(config, checkpoint)


@pytest.fixture(scope="module")
def denoiser(config, checkpoint):
    from vidgen_serve.pipeline import Denoiser

    return Denoiser(config, checkpoint)


def run(denoiser, text_encoder, config, **fields):
    fields = {"prompt": "a red fox running through snow", "duration": 1, "resolution": "480p",
              "num_inference_steps": 6, "seed": 11, **fields}
    plan = build_plan(VideoRequest(**fields), config)
    return denoiser.denoise(plan, text_encoder.encode(plan))


@pytest.fixture(scope="module")
def plain(denoiser, text_encoder, config):
    return run(denoiser, text_encoder, config)


def block_calls(transformer) -> list:
    """Records every call of the last block's feed-forward (skipped when a step is served from cache)."""
    calls: list = []
    transformer.blocks[-1].ffn.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_attention_backend_matches_native(config, checkpoint, text_encoder, plain):
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    from vidgen_serve.pipeline import Denoiser

    before = _AttentionBackendRegistry.get_active_backend()[0]
    math = Denoiser(AppConfig(profile_overrides={**BF16, "attention_backend": "_native_math"}), checkpoint)
    processor = math.transformer.blocks[0].attn1.processor
    assert processor._attention_backend.value == "_native_math"
    assert _AttentionBackendRegistry.get_active_backend()[0] == before  # other models unaffected
    out = run(math, text_encoder, config)
    assert not torch.equal(out, plain)  # another kernel really ran
    assert rel(out, plain) < 0.03


def test_step_cache_off_is_the_plain_path_exactly(denoiser, text_encoder, config, plain):
    assert torch.equal(run(denoiser, text_encoder, config, step_cache="off"), plain)
    cached = run(denoiser, text_encoder, config, step_cache="taylorseer")
    assert not torch.equal(cached, plain)
    # The cached run's hooks are gone: plain runs are bit-identical again, on the same transformer.
    assert not denoiser.transformer.is_cache_enabled
    assert torch.equal(run(denoiser, text_encoder, config), plain)


@pytest.mark.parametrize("mode", ["first_block", "taylorseer"])
def test_step_cache_skips_steps_and_stays_close(checkpoint, text_encoder, config, plain, mode):
    from vidgen_serve.pipeline import Denoiser

    # The profile's default (the plan takes it when the request names none).
    cached_config = AppConfig(profile_overrides={**BF16, "step_cache": mode, "step_cache_threshold": 0.5})
    cached = Denoiser(cached_config, checkpoint)
    calls = block_calls(cached.transformer)
    out = run(cached, text_encoder, cached_config)
    assert 1 <= len(calls) < 6  # fewer full passes than the 6 steps
    assert rel(out, plain) < 0.15
    calls.clear()
    assert torch.equal(run(cached, text_encoder, cached_config, step_cache="off"), plain)  # a request opts out
    assert len(calls) == 6


def test_step_cache_over_sliding_windows(denoiser, text_encoder, config):
    """Each window keeps its own cache state: a long video with caching stays close to the plain one."""
    long = {"duration": 12, "num_inference_steps": 6}
    reference = run(denoiser, text_encoder, config, **long)
    calls = block_calls(denoiser.transformer)
    cached = run(denoiser, text_encoder, config, step_cache="taylorseer", **long)
    windows = 3
    assert len(calls) < 6 * windows
    assert rel(cached, reference) < 0.15


def test_int8_weights_run_on_the_tiny_model(checkpoint, text_encoder, config, plain):
    from vidgen_serve.models.loading import load_transformer
    from vidgen_serve.pipeline import Denoiser, TextEncoder

    int8 = AppConfig(profile_overrides={**BF16, "quantization": "int8_weight_only",
                                        "text_encoder_quantization": "int8_weight_only"})
    denoiser = Denoiser(int8, checkpoint)
    weight = denoiser.transformer.blocks[0].attn1.to_q.weight
    assert type(weight).__name__ == "Int8Tensor"
    assert type(denoiser.transformer.condition_embedder.time_embedder.linear_1.weight) is torch.nn.Parameter
    assert denoiser.dtype == torch.bfloat16
    out = run(denoiser, text_encoder, config)
    assert rel(out, plain) < 0.05
    encoder = TextEncoder(int8, checkpoint)
    plan = build_plan(VideoRequest(prompt="a red fox", duration=1, resolution="480p"), config)
    assert rel(encoder.encode(plan).prompt_embeds, text_encoder.encode(plan).prompt_embeds) < 0.05
    # Random weights quantise the same layers as the checkpoint loader's TorchAoConfig.
    random = load_transformer(checkpoint, int8.model_profile.model_copy(update={"weights": "random"}),
                              torch.device("cpu"))
    kinds = lambda m: {n: type(p).__name__ for n, p in m.named_parameters()}  # noqa: E731
    assert kinds(random) == kinds(denoiser.transformer)


def test_vae_tiling_stays_close(checkpoint, pipeline, tiny_config):
    from vidgen_serve.pipeline import Decoder

    plan = build_plan(VideoRequest(prompt="a red fox", duration=1, resolution="480p", num_inference_steps=2,
                                   seed=3), tiny_config)
    latents = pipeline.denoiser.denoise(plan, pipeline.text_encoder.encode(plan))
    tiled = Decoder(AppConfig(profile_overrides={"vae_tiling": True, "vae_tile_px": 32}), checkpoint)
    assert tiled.vae.use_tiling and plan.native_width > 32  # really decoded in tiles
    a = tiled.decode_latents(plan, latents).astype(float)
    b = pipeline.decoder.decode_latents(plan, latents).astype(float)
    assert a.shape == b.shape
    assert not np.array_equal(a, b)
    # Tiles of 4x4 latents are far smaller than the tiny decoder's receptive field, so the tiled frames
    # are an approximation; they must still be the same video, much nearer than another one.
    other_plan = plan.model_copy(update={"seed": 4})
    other = pipeline.decoder.decode_latents(plan, pipeline.denoiser.denoise(other_plan, pipeline.text_encoder.encode(
        other_plan))).astype(float)
    corr = lambda x, y: np.corrcoef(x.ravel(), y.ravel())[0, 1]  # noqa: E731
    assert corr(a, b) > corr(other, b) + 0.25
    assert np.abs(a - b).mean() < 0.75 * np.abs(other - b).mean()
