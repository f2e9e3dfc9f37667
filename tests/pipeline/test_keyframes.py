"""Keyframes drive the sliding windows: each window is conditioned on the prompt(s) in force over
its frames, blended across a change, on the real tiny transformer (tiny profile: 8 fps native,
41-frame windows, so 12 s is three windows of 11 latent frames)."""

from __future__ import annotations

import pytest
import torch

from vidgen_serve.pipeline.denoiser import window_condition
from vidgen_serve.plan import GenerationPlan, build_plan
from vidgen_serve.request import VideoRequest

BASE = {"prompt": "a red fox running through snow", "duration": 12, "resolution": "480p", "seed": 11,
        "num_inference_steps": 2}
KEYFRAME = [{"time_s": 6, "prompt": "a rainbow over a green meadow"}]


def plan_of(config, **fields) -> GenerationPlan:
    return build_plan(VideoRequest(**{**BASE, **fields}), config)


def test_a_keyframe_gives_windows_different_prompt_weights(tiny_config):
    plan = plan_of(tiny_config, keyframes=KEYFRAME)
    assert len(plan.prompts) == 2 and plan.prompts[1].startswith("a rainbow over a green meadow")
    assert [(w.start, w.end) for w in plan.windows] == [(0, 11), (7, 18), (14, 25)]
    # 6 s is pixel frame 48; latent frame l>0 starts at pixel frame 4l-3, so latent 13 is the first under it.
    assert [w.prompt_weights for w in plan.windows] == [[(0, 1.0)], [(0, 6 / 11), (1, 5 / 11)], [(1, 1.0)]]
    assert [w.prompt_index for w in plan.windows] == [0, 0, 1]
    assert plan.summary()["window_prompts"] == [[(0, 1.0)], [(0, 0.5455), (1, 0.4545)], [(1, 1.0)]]
    assert GenerationPlan.model_validate_json(plan.model_dump_json()) == plan  # still serialisable
    # The same schedule from a time directive in the prompt.
    directed = plan_of(tiny_config, prompt=BASE["prompt"] + ", at 6s: a rainbow appears")
    assert [w.prompt_weights for w in directed.windows] == [w.prompt_weights for w in plan.windows]
    assert directed.prompts[1].startswith("a red fox running through snow, a rainbow appears")
    # No keyframe: one prompt everywhere.
    assert [w.prompt_weights for w in plan_of(tiny_config).windows] == [[(0, 1.0)]] * 3


def _run_capturing(pipeline, plan):
    """Denoise `plan`; return the final latents and the conditional encoder_hidden_states of each
    transformer call, in call order (window-major within each step)."""
    seen = []

    def hook(_module, _args, kwargs):
        seen.append(kwargs["encoder_hidden_states"][0].detach().clone())  # row 0: the conditional pass

    transformer = pipeline.denoiser.transformer
    handle = transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        embeddings = pipeline.text_encoder.encode(plan)
        latents = pipeline.denoiser.denoise(plan, embeddings)
    finally:
        handle.remove()
    return latents, seen, embeddings


@pytest.fixture(scope="module")
def keyframed(pipeline, tiny_config):
    plan = plan_of(tiny_config, keyframes=KEYFRAME)
    return (plan, *_run_capturing(pipeline, plan))


@pytest.fixture(scope="module")
def single(pipeline, tiny_config):
    plan = plan_of(tiny_config)
    return (plan, *_run_capturing(pipeline, plan))


def test_windows_receive_different_text_conditioning(keyframed):
    plan, _latents, seen, embeddings = keyframed
    windows = len(plan.windows)
    assert len(seen) == plan.num_inference_steps * windows
    first, middle, last = seen[:windows]
    rows = embeddings.prompt_embeds
    assert torch.equal(first, rows[0]) and torch.equal(last, rows[1])
    assert torch.allclose(middle, rows[0] * (6 / 11) + rows[1] * (5 / 11), atol=1e-6)
    assert not torch.equal(first, middle) and not torch.equal(middle, last) and not torch.equal(first, last)
    assert (first - last).abs().mean() > 1e-3
    for step in range(1, plan.num_inference_steps):  # every step conditions each window the same way
        for k in range(windows):
            assert torch.equal(seen[step * windows + k], seen[k])


def test_the_keyframe_changes_the_latents(keyframed, single):
    _plan, latents, _seen, _emb = keyframed
    _plan1, latents1, seen1, emb1 = single
    assert latents.shape == latents1.shape
    assert (latents - latents1).abs().mean() > 1e-4
    # Without the keyframe every transformer call got prompt 0's embedding, exactly.
    assert all(torch.equal(s, emb1.prompt_embeds[0]) for s in seen1)


def test_a_single_prompt_is_bit_identical_to_explicit_full_weight(pipeline, single):
    plan, latents, _seen, embeddings = single
    explicit = plan.model_copy(update={"windows": [w.model_copy(update={"prompt_weights": [(0, 1.0)]})
                                                   for w in plan.windows]})
    again = pipeline.denoiser.denoise(explicit, embeddings)
    assert torch.equal(again, latents)
    # A weight of 1.0 is the embedding row itself: a view, no arithmetic.
    conds = embeddings.prompt_embeds
    cond = window_condition(conds, [(0, 1.0)])
    assert cond.data_ptr() == conds.data_ptr() and torch.equal(cond, conds[:1])
    # A keyframe that repeats the prompt adds no prompt and changes nothing.
    repeat = plan_of(pipeline.config, keyframes=[{"time_s": 6, "prompt": BASE["prompt"]}])
    assert repeat.prompts == plan.prompts
    assert [w.prompt_weights for w in repeat.windows] == [[(0, 1.0)]] * len(plan.windows)
    assert torch.equal(pipeline.denoiser.denoise(repeat, pipeline.text_encoder.encode(repeat)), latents)


def test_window_condition_blends_in_float32():
    conds = torch.stack([torch.full((4, 3), 1.0), torch.full((4, 3), 3.0)]).to(torch.bfloat16)
    mixed = window_condition(conds, [(0, 0.25), (1, 0.75)])
    assert mixed.dtype == torch.bfloat16 and mixed.shape == (1, 4, 3)
    assert torch.equal(mixed.float(), torch.full((1, 4, 3), 2.5))
