"""The stage classes on the tiny checkpoint: sliding windows, MP4 output, determinism,
the text encoder's cache, progress and cancellation."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from vidgen_serve.config import AppConfig
from vidgen_serve.errors import GenerationCancelled
from vidgen_serve.pipeline import TextEncoder
from vidgen_serve.plan import build_plan
from vidgen_serve.request import VideoRequest


def make_plan(config, **fields):
    fields = {"prompt": "a red fox running through snow", "duration": 1, "resolution": "480p", "fps": 15,
              "seed": 7, **fields}
    return build_plan(VideoRequest(**fields), config)


# --- sliding windows, end to end ---------------------------------------------------


@pytest.fixture(scope="module", params=[8, 12], ids=lambda d: f"{d}s")
def long_video(request, pipeline, tiny_config, tmp_path_factory):
    """A video longer than one window, run stage by stage (latents and frames kept)."""
    plan = make_plan(tiny_config, duration=request.param, seed=2024)
    events = []
    embeddings = pipeline.text_encoder.encode(plan)
    latents = pipeline.denoiser.denoise(plan, embeddings, progress=events.append)
    frames = pipeline.decoder.decode_latents(plan, latents)
    path = pipeline.decoder.write_mp4(plan, frames, tmp_path_factory.mktemp("long") / "video.mp4")
    return plan, events, latents, frames, path


@pytest.mark.slow
def test_long_video_uses_several_windows(long_video):
    plan, _events, latents, frames, _path = long_video
    assert len(plan.windows) >= 2
    assert latents.shape == (1, 16, plan.latent_frames, plan.latent_height, plan.latent_width)
    assert torch.isfinite(latents).all()
    assert frames.shape == (plan.num_frames, plan.native_height, plan.native_width, 3)
    assert frames.dtype == np.uint8


@pytest.mark.slow
def test_long_video_mp4(long_video, probe_mp4):
    plan, _events, _latents, _frames, path = long_video
    info = probe_mp4(path)
    assert info["codec"] == "h264"
    assert info["pix_fmt"] == "yuv420p"
    assert (info["width"], info["height"]) == (854, 480)
    assert info["fps"] == 15
    assert info["num_frames"] == plan.output_num_frames == round(plan.duration_s * 15)
    assert info["duration_s"] == pytest.approx(plan.duration_s, abs=1 / 15)
    assert info["boxes"].index("moov") < info["boxes"].index("mdat")  # +faststart


@pytest.mark.slow
def test_progress_reports_every_step_and_window_once_in_order(long_video):
    plan, events, *_ = long_video
    n_steps, n_windows = plan.num_inference_steps, len(plan.windows)
    assert [(e["step"], e["window"]) for e in events] == [
        (s, w) for s in range(1, n_steps + 1) for w in range(1, n_windows + 1)
    ]
    assert all(e["steps"] == n_steps and e["windows"] == n_windows for e in events)


# --- determinism ---------------------------------------------------------------------


@pytest.mark.slow
def test_same_seed_same_frames_different_seed_different(pipeline, tiny_config, tmp_path, probe_mp4):
    results = {}
    for name, seed in [("a", 11), ("b", 11), ("c", 12)]:
        plan = make_plan(tiny_config, seed=seed)
        result = pipeline.generate(plan, tmp_path / f"{name}.mp4")
        assert result.path.exists() and result.plan.seed == seed
        assert {"text_encode", "denoise", "vae_decode", "encode", "total"} <= set(result.timings)
        results[name] = probe_mp4(result.path)["frames"]
    assert results["a"].shape == (15, 480, 854, 3)
    assert np.array_equal(results["a"], results["b"])
    assert not np.array_equal(results["a"], results["c"])
    assert np.abs(results["a"].astype(int) - results["c"].astype(int)).mean() > 0.5


def test_same_seed_same_latents(pipeline, tiny_config):
    plan = make_plan(tiny_config, seed=5, num_inference_steps=2)
    emb = pipeline.text_encoder.encode(plan)
    first = pipeline.denoiser.denoise(plan, emb)
    second = pipeline.denoiser.denoise(plan, emb)
    assert torch.equal(first, second)
    other = pipeline.denoiser.denoise(make_plan(tiny_config, seed=6, num_inference_steps=2), emb)
    assert (first - other).abs().max().item() > 1e-2


def test_request_seed_reproduces_a_random_seed_run(pipeline, tiny_config):
    """A plan without a seed records the one it drew; replaying it gives the same latents."""
    request = VideoRequest(prompt="waves on a beach", duration=1, resolution="480p", num_inference_steps=1)
    plan = build_plan(request, tiny_config)
    replay = build_plan(request.model_copy(update={"seed": plan.seed}), tiny_config)
    emb = pipeline.text_encoder.encode(plan)
    assert torch.equal(pipeline.denoiser.denoise(plan, emb), pipeline.denoiser.denoise(replay, emb))


# --- text encoder ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_cache_encoder(checkpoint):
    return TextEncoder(AppConfig(profile_overrides={"text_cache_size": 2}), checkpoint)


def test_text_cache_hit_returns_equal_tensors(small_cache_encoder, tiny_config):
    plan = make_plan(tiny_config, prompt="a lighthouse in a storm", negative_prompt="boats")
    first = small_cache_encoder.encode(plan)
    assert (first.cache_hits, first.cache_misses) == (0, 2)  # prompt + negative prompt
    second = small_cache_encoder.encode(plan)
    assert (second.cache_hits, second.cache_misses) == (2, 0)
    assert torch.equal(first.prompt_embeds, second.prompt_embeds)
    assert torch.equal(first.negative_prompt_embeds, second.negative_prompt_embeds)
    max_len = tiny_config.model_profile.max_sequence_length
    assert first.prompt_embeds.shape == (1, max_len, 32)
    assert first.negative_prompt_embeds.shape == (1, max_len, 32)
    assert not torch.equal(first.prompt_embeds, first.negative_prompt_embeds)


def test_text_cache_evicts_least_recently_used(small_cache_encoder, tiny_config):
    def encode(prompt):
        emb = small_cache_encoder.encode(make_plan(tiny_config, prompt=prompt, guidance_scale=1.0))
        assert emb.negative_prompt_embeds is None  # no guidance: only the prompt is encoded
        return "hit" if emb.cache_hits else "miss"

    sequence = [encode(p) for p in ["p-a", "p-b", "p-a", "p-c", "p-a", "p-b", "p-c"]]
    # size 2: [a] [a b] a-hit [b a] +c evicts b [a c] a-hit [c a] +b evicts c [a b] c-miss
    assert sequence == ["miss", "miss", "hit", "miss", "hit", "miss", "miss"]


def test_text_cache_disabled(checkpoint, tiny_config):
    encoder = TextEncoder(AppConfig(profile_overrides={"text_cache_size": 0}), checkpoint)
    plan = make_plan(tiny_config, guidance_scale=1.0)
    first, second = encoder.encode(plan), encoder.encode(plan)
    assert (second.cache_hits, second.cache_misses) == (0, 1)
    assert torch.equal(first.prompt_embeds, second.prompt_embeds)


def test_cached_embeddings_equal_fresh_ones(pipeline, checkpoint, tiny_config):
    plan = make_plan(tiny_config, prompt="主体:熊猫;动作:吃竹子;场景:竹林;风格:3D动画")
    pipeline.text_encoder.encode(plan)
    cached = pipeline.text_encoder.encode(plan)
    assert cached.cache_hits == 2
    fresh = TextEncoder(AppConfig(profile_overrides={"text_cache_size": 0}), checkpoint).encode(plan)
    assert torch.equal(cached.prompt_embeds, fresh.prompt_embeds)
    assert torch.equal(cached.negative_prompt_embeds, fresh.negative_prompt_embeds)


def test_count_tokens_matches_what_the_encoder_sees(pipeline, tiny_config):
    encoder = pipeline.text_encoder
    max_len = tiny_config.model_profile.max_sequence_length
    assert encoder.count_tokens("") == 1  # just the end-of-sequence token
    short = "a cat"
    longer = "a cat chasing butterflies under a cherry blossom tree"
    assert 1 < encoder.count_tokens(short) < encoder.count_tokens(longer)
    # WanPipeline zeroes the embedding rows past the prompt's tokens: the count is where they start.
    for text in (short, longer, "  a    cat &amp;\n\n dog  "):
        plan = make_plan(tiny_config, prompt=text, guidance_scale=1.0)
        n = encoder.count_tokens(plan.prompts[0])  # the prompt after the style template
        assert n < max_len
        emb = encoder.encode(plan).prompt_embeds[0]
        assert emb[:n].abs().sum(dim=-1).min() > 0
        assert emb[n:].abs().max() == 0
    # Counted after WanPipeline's cleaning: HTML entities and runs of whitespace collapse.
    assert encoder.count_tokens("  a    cat &amp;\n\n dog  ") == encoder.count_tokens("a cat & dog")
    very_long = " ".join(["butterflies dancing over a river"] * 40)
    assert encoder.count_tokens(very_long) > max_len  # over the limit: the encoder truncates
    emb = encoder.encode(make_plan(tiny_config, prompt=very_long, guidance_scale=1.0)).prompt_embeds
    assert emb.shape == (1, max_len, 32)
    assert emb[0].abs().sum(dim=-1).min() > 0  # every position used


# --- cancellation ------------------------------------------------------------------------


def test_cancel_at_step_two(pipeline, tiny_config):
    plan = make_plan(tiny_config, duration=2, num_inference_steps=4)
    emb = pipeline.text_encoder.encode(plan)
    checks, events = [], []

    def should_cancel():
        checks.append(len(checks) + 1)
        return len(checks) >= 2

    with pytest.raises(GenerationCancelled) as info:
        pipeline.denoiser.denoise(plan, emb, progress=events.append, should_cancel=should_cancel)
    assert info.value.code == "cancelled" and info.value.status_code == 409
    assert "step 2/4" in info.value.message
    assert checks == [1, 2]  # checked at each step boundary, stopped at the second
    assert [(e["step"], e["window"]) for e in events] == [(1, 1)]  # step 1 ran, step 2 did not


def test_cancelled_generation_writes_no_file(pipeline, tiny_config, tmp_path):
    plan = make_plan(tiny_config, duration=12, num_inference_steps=4)  # 3 windows
    events = []
    with pytest.raises(GenerationCancelled):
        pipeline.generate(plan, tmp_path / "v.mp4", progress=events.append,
                          should_cancel=lambda: len(events) >= len(plan.windows))
    assert [(e["step"], e["window"]) for e in events] == [(1, w) for w in range(1, len(plan.windows) + 1)]
    assert os.listdir(tmp_path) == []


def test_never_cancelled_runs_all_steps(pipeline, tiny_config):
    plan = make_plan(tiny_config, num_inference_steps=3)
    events = []
    pipeline.denoiser.denoise(plan, pipeline.text_encoder.encode(plan), progress=events.append,
                              should_cancel=lambda: False)
    assert [(e["step"], e["window"]) for e in events] == [(1, 1), (2, 1), (3, 1)]


def test_decoder_rejects_latents_of_another_plan(pipeline, tiny_config):
    plan = make_plan(tiny_config, duration=2)
    with pytest.raises(ValueError, match="does not match"):
        pipeline.decoder.decode_latents(plan, torch.zeros(1, 16, plan.latent_frames + 1, plan.latent_height,
                                                          plan.latent_width))


def test_decode_reports_its_phases_with_a_fraction(pipeline, tiny_config, tmp_path):
    plan = make_plan(tiny_config, num_inference_steps=1)
    latents = pipeline.denoiser.denoise(plan, pipeline.text_encoder.encode(plan))
    events = []
    pipeline.decoder.decode(plan, latents, tmp_path / "v.mp4", progress=events.append)
    vae = [e["fraction"] for e in events if e["phase"] == "vae_decode"]
    # One event as the phase starts, then one per latent frame the VAE decodes.
    assert vae == pytest.approx([0.0] + [k / plan.latent_frames for k in range(1, plan.latent_frames + 1)], abs=1e-4)
    assert [e for e in events if e["phase"] == "encode"] == [{"phase": "encode", "fraction": 0.0},
                                                             {"phase": "encode", "fraction": 1.0}]
    assert [e["phase"] for e in events] == ["vae_decode"] * len(vae) + ["encode"] * 2  # in order


def test_concurrent_decodes_equal_sequential_ones(pipeline, tiny_config):
    """A Decoder replica takes two decodes at once; the Wan VAE keeps a per-module frame cache."""
    import threading

    plans = [make_plan(tiny_config, seed=s, num_inference_steps=1, duration=2) for s in (1, 2)]
    latents = [pipeline.denoiser.denoise(p, pipeline.text_encoder.encode(p)) for p in plans]
    expected = [pipeline.decoder.decode_latents(p, x) for p, x in zip(plans, latents)]
    results: dict[int, np.ndarray] = {}
    start = threading.Barrier(2)

    def decode(i: int) -> None:
        start.wait()
        results[i] = pipeline.decoder.decode_latents(plans[i], latents[i])

    threads = [threading.Thread(target=decode, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        assert np.array_equal(results[i], expected[i]), f"decode {i} differs from its sequential result"
