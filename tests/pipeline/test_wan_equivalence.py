"""The split stages reproduce diffusers' own `WanPipeline` on the same checkpoint.

This is the proof that serving runs the real model code: TextEncoder -> Denoiser (CFG
with cond and uncond batched) -> Decoder gives the latents and frames that
`WanPipeline.__call__` gives for the same prompt, negative prompt, sizes, steps,
guidance and seed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vidgen_serve.plan import build_plan
from vidgen_serve.request import VideoRequest


@pytest.fixture(scope="module")
def wan_pipe(checkpoint):
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(checkpoint)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference(wan_pipe, plan, profile, output_type):
    assert len(plan.windows) == 1, "WanPipeline has no sliding windows: compare single-window plans"
    return wan_pipe(
        prompt=plan.prompts[0],
        negative_prompt=plan.negative_prompt,
        height=plan.native_height,
        width=plan.native_width,
        num_frames=plan.num_frames,
        num_inference_steps=plan.num_inference_steps,
        guidance_scale=plan.guidance_scale,
        max_sequence_length=profile.max_sequence_length,
        generator=torch.Generator().manual_seed(plan.seed),
        output_type=output_type,
    ).frames


@pytest.mark.slow
def test_latents_and_frames_match_wan_pipeline(wan_pipe, pipeline, tiny_config):
    request = VideoRequest(prompt="一只橘猫在樱花树下追逐蝴蝶", negative_prompt="dogs", duration=2,
                           resolution="480p", seed=1234)
    plan = build_plan(request, tiny_config)
    profile = tiny_config.model_profile

    embeddings = pipeline.text_encoder.encode(plan)
    ours = pipeline.denoiser.denoise(plan, embeddings)
    ref = reference(wan_pipe, plan, profile, "latent")
    assert ours.shape == ref.shape == (1, 16, plan.latent_frames, plan.latent_height, plan.latent_width)
    assert (ours - ref).abs().max().item() <= 1e-4
    assert ours.std().item() > 0.1  # not a degenerate all-equal output

    frames = pipeline.decoder.decode_latents(plan, ours)
    ref_frames = reference(wan_pipe, plan, profile, "np")[0]
    assert frames.shape == ref_frames.shape == (plan.num_frames, plan.native_height, plan.native_width, 3)
    ref_u8 = np.round(ref_frames * 255.0).clip(0, 255).astype(np.int16)
    diff = np.abs(ref_u8 - frames.astype(np.int16))
    assert (diff <= 1).mean() >= 0.999  # within 1/255 in all but a negligible fraction
    assert diff.max() <= 4
    assert frames.std() > 1.0  # the frames have content to compare


@pytest.mark.parametrize("aspect,guidance,steps", [("9:16", 1.0, 3), ("1:1", 7.5, 2)])
def test_latents_match_other_settings(wan_pipe, pipeline, tiny_config, aspect, guidance, steps):
    """No guidance (uncond skipped on both sides), another aspect, another step count."""
    request = VideoRequest(prompt="a panda eating bamboo", style="anime", duration=1, resolution="480p",
                           aspect=aspect, seed=99, guidance_scale=guidance, num_inference_steps=steps)
    plan = build_plan(request, tiny_config)
    embeddings = pipeline.text_encoder.encode(plan)
    assert (embeddings.negative_prompt_embeds is None) == (guidance == 1.0)
    ours = pipeline.denoiser.denoise(plan, embeddings)
    ref = reference(wan_pipe, plan, tiny_config.model_profile, "latent")
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= 1e-4
