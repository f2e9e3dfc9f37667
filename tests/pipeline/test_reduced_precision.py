"""bfloat16 end to end on the tiny model (the path that crashed on H100), and the checks that refuse
a dtype / kernel / quantisation the machine can't run, before any model loads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vidgen_serve.config import AppConfig
from vidgen_serve.errors import VidgenError
from vidgen_serve.models.loading import _dtype_failure, check_runtime, runtime_problems
from vidgen_serve.plan import build_plan
from vidgen_serve.request import VideoRequest

BF16 = {"dtype": "bfloat16", "vae_dtype": "bfloat16"}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def bf16_pipeline(checkpoint):
    from vidgen_serve.pipeline import VideoPipeline

    return VideoPipeline(AppConfig(profile_overrides=BF16))


def test_bf16_stages_compute_in_bf16_and_match_fp32(bf16_pipeline, pipeline, tiny_config):
    plan = build_plan(VideoRequest(prompt="a red fox running through snow", duration=1, resolution="480p",
                                   num_inference_steps=3, seed=7), tiny_config)
    # Text encoder: embeddings in the encoder's dtype, close to float32's.
    emb16, emb32 = bf16_pipeline.text_encoder.encode(plan), pipeline.text_encoder.encode(plan)
    assert emb16.prompt_embeds.dtype == torch.bfloat16 and emb32.prompt_embeds.dtype == torch.float32
    assert rel(emb16.prompt_embeds, emb32.prompt_embeds) < 0.03
    # Denoiser: bf16 compute, diffusers' float32 modules kept, latents close to float32's.
    denoiser = bf16_pipeline.denoiser
    assert denoiser.dtype == torch.bfloat16
    assert denoiser.transformer.scale_shift_table.dtype == torch.float32
    assert denoiser.transformer.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32
    lat16, lat32 = denoiser.denoise(plan, emb16), pipeline.denoiser.denoise(plan, emb32)
    assert lat16.dtype == torch.float32 and torch.isfinite(lat16).all()  # the stage's output contract
    assert rel(lat16, lat32) < 0.05
    # VAE in bf16: frames within a few levels of float32's.
    frames16 = bf16_pipeline.decoder.decode_latents(plan, lat32).astype(int)
    frames32 = pipeline.decoder.decode_latents(plan, lat32).astype(int)
    assert bf16_pipeline.decoder.vae.dtype == torch.bfloat16
    assert frames16.shape == frames32.shape
    assert frames32.std() > 5  # content to compare
    assert np.abs(frames16 - frames32).mean() < 0.1 * frames32.std()  # bf16 rounding, not another picture


def test_this_cpu_runs_every_dtype():
    for dtype in ("float32", "bfloat16", "float16"):
        assert _dtype_failure("cpu", dtype) is None


def test_a_gpu_without_bf16_is_refused_naming_the_field_and_the_valid_dtypes():
    profile = AppConfig(profile="wan2.1-1.3b").model_profile  # dtype bfloat16, vae float32
    no_bf16 = lambda device, dtype: "Tesla V100 has no bfloat16 support" if dtype == "bfloat16" else None  # noqa: E731
    problems = runtime_problems(profile, torch.device("cuda", 0), dtype_failure=no_bf16)
    assert problems == ["dtype='bfloat16' cannot run on cuda:0: Tesla V100 has no bfloat16 support; "
                        "valid values here: ['float32', 'float16']"]


def test_settings_this_machine_cannot_run_fail_before_loading():
    profile = AppConfig(profile_overrides={"quantization": "float8_dynamic",
                                           "attention_backend": "_native_flash"}).model_profile
    with pytest.raises(VidgenError) as info:
        check_runtime(profile)
    message = info.value.message
    assert info.value.code == "invalid_profile"
    assert "quantization='float8_dynamic'" in message and "['none', 'int8_weight_only']" in message
    assert "attention_backend='_native_flash'" in message and "['native', '_native_math']" in message
    check_runtime(AppConfig(profile_overrides={**BF16, "quantization": "int8_weight_only"}).model_profile)


def test_unknown_and_bad_overrides_name_the_field():
    with pytest.raises(ValueError, match=r"unknown field\(s\) 'dtpye'; valid fields: .*dtype"):
        AppConfig(profile_overrides={"dtpye": "bfloat16"})
    with pytest.raises(ValueError, match=r"profile_overrides.dtype='bf16': Input should be 'float32', 'bfloat16'"):
        AppConfig(profile_overrides={"dtype": "bf16"})
    with pytest.raises(ValueError, match=r"weights='random' needs the architecture of checkpoint='org/unknown'"):
        AppConfig(profile_overrides={"weights": "random", "checkpoint": "org/unknown"})
