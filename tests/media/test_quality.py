"""Per-video quality metrics: scikit-image's SSIM as the reference, VBench's flicker definition,
the capped PSNR, and the metrics on real decoded frames of the tiny model (fixed seeds)."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.metrics import structural_similarity

from vidgen_serve.media import quality as quality_module
from vidgen_serve.media.quality import PSNR_CAP_DB, parse_quality_header, quality_header, quality_metrics
from vidgen_serve.plan import build_plan
from vidgen_serve.request import VideoRequest


def skimage_temporal_ssim(frames: np.ndarray) -> float:
    """The reference: scikit-image's SSIM with Wang et al.'s parameters, per channel, per pair."""
    return float(np.mean([
        structural_similarity(frames[i], frames[i + 1], channel_axis=-1, gaussian_weights=True, sigma=1.5,
                              use_sample_covariance=False, data_range=255)
        for i in range(len(frames) - 1)]))


def vbench_flicker(frames: np.ndarray) -> float:
    """VBench's temporal_flickering score, pair by pair as VBench writes it."""
    maes = [np.mean(np.abs(frames[i].astype(np.float32) - frames[i + 1].astype(np.float32)))
            for i in range(len(frames) - 1)]
    return (255.0 - float(np.mean(maes))) / 255.0


def synthetic_video(seed: int = 0, frames: int = 9, height: int = 64, width: int = 112) -> np.ndarray:
    """A smooth gradient scene drifting right, with a little noise: realistic SSIM values, not ~0 or ~1."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    out = []
    for t in range(frames):
        scene = 120 + 80 * np.sin((xx - 2 * t) / 9.0)[..., None] * np.array([1.0, 0.6, 0.3]) + 0.4 * yy[..., None]
        out.append(scene + rng.normal(0, 4, (height, width, 3)))
    return np.clip(np.stack(out), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def decoded(pipeline, tiny_config):
    """Native frames of a 2 s tiny-model video at a fixed seed."""
    plan = build_plan(VideoRequest(prompt="a red fox running through snow", duration=2, resolution="480p",
                                   num_inference_steps=2, seed=11), tiny_config)
    latents = pipeline.denoiser.denoise(plan, pipeline.text_encoder.encode(plan))
    return plan, pipeline.decoder.decode_latents(plan, latents)


def test_ssim_matches_skimage_on_synthetic_frames(monkeypatch):
    frames = synthetic_video()
    ours = quality_metrics(frames)
    assert 0.2 < ours["temporal_ssim"] < 0.95  # a meaningful value, not a degenerate one
    assert ours["temporal_ssim"] == pytest.approx(skimage_temporal_ssim(frames), abs=1e-3)
    noise = np.random.default_rng(1).integers(0, 256, (5, 40, 48, 3), dtype=np.uint8)
    assert quality_metrics(noise)["temporal_ssim"] == pytest.approx(skimage_temporal_ssim(noise), abs=1e-3)
    # Batching (frame pairs in several batches) changes nothing.
    monkeypatch.setattr(quality_module, "_BATCH_BYTES", 1)
    assert quality_metrics(frames) == pytest.approx(ours, abs=1e-6)  # float32 sums in another order


def test_flicker_and_psnr_follow_their_definitions():
    frames = synthetic_video(seed=3)
    q = quality_metrics(frames)
    assert q["flicker"] == pytest.approx(vbench_flicker(frames), abs=1e-7)
    pairs = frames.astype(np.float64)
    mse = ((pairs[1:] - pairs[:-1]) ** 2).mean(axis=(1, 2, 3))
    assert q["temporal_psnr_db"] == pytest.approx(float(np.mean(10 * np.log10(255.0 ** 2 / mse))), abs=1e-6)


def test_identical_frames_score_perfectly_with_a_finite_psnr():
    frame = synthetic_video(frames=1)[0]
    still = np.stack([frame] * 6)
    q = quality_metrics(still)
    assert q["temporal_ssim"] == pytest.approx(1.0, abs=1e-9)
    assert q["temporal_psnr_db"] == PSNR_CAP_DB
    assert q["flicker"] == 1.0
    # One changed pixel in one pair: a finite PSNR of that pair, still capped in the mean.
    nearly = still.copy()
    nearly[3, 0, 0, 0] ^= 1
    assert quality_metrics(nearly)["temporal_psnr_db"] <= PSNR_CAP_DB


def test_ssim_matches_skimage_on_decoded_frames(decoded):
    plan, frames = decoded
    assert frames.shape == (plan.num_frames, plan.native_height, plan.native_width, 3)
    ours = quality_metrics(frames)
    assert ours["temporal_ssim"] == pytest.approx(skimage_temporal_ssim(frames), abs=1e-3)
    assert ours["flicker"] == pytest.approx(vbench_flicker(frames), abs=1e-7)


def test_shuffled_or_noisy_video_scores_lower(decoded):
    _plan, frames = decoded
    base = quality_metrics(frames)
    # Every frame moved away from its neighbours (a fixed permutation with no consecutive pair kept).
    order = np.random.default_rng(5).permutation(len(frames))
    while np.any(np.abs(np.diff(order)) == 1):
        order = np.random.default_rng(int(order[0]) + 100 * len(order)).permutation(len(frames))
    shuffled = quality_metrics(frames[order])
    noisy_frames = np.clip(frames + np.random.default_rng(6).normal(0, 12, frames.shape), 0, 255).astype(np.uint8)
    noisy = quality_metrics(noisy_frames)
    for metric in ("temporal_ssim", "temporal_psnr_db", "flicker"):
        assert shuffled[metric] < base[metric], (metric, base, shuffled)
        assert noisy[metric] < base[metric], (metric, base, noisy)


def test_inprocess_pipeline_reports_the_metrics(pipeline, tiny_config, decoded, tmp_path):
    plan, frames = decoded
    result = pipeline.generate(plan, tmp_path / "video.mp4")
    assert result.quality == pytest.approx(quality_metrics(frames), abs=1e-9)  # the native frames' metrics
    assert 0 < result.quality["temporal_ssim"] <= 1 and 0 < result.quality["flicker"] <= 1
    assert 0 < result.quality["temporal_psnr_db"] <= PSNR_CAP_DB
    assert result.timings["quality_metrics"] >= 0


def test_header_round_trips():
    q = {"temporal_ssim": 0.93104, "temporal_psnr_db": 27.4123, "flicker": 0.98201}
    header = quality_header(q)
    assert header == {"X-Vidgen-Quality": "temporal_ssim=0.9310;temporal_psnr_db=27.41;flicker=0.9820"}
    assert parse_quality_header(header["X-Vidgen-Quality"]) == {"temporal_ssim": 0.931, "temporal_psnr_db": 27.41,
                                                                "flicker": 0.982}
    assert quality_header({}) == {}


def test_bad_input():
    assert quality_metrics(np.zeros((1, 32, 32, 3), np.uint8)) == {}  # one frame: nothing to compare
    with pytest.raises(ValueError, match="uint8"):
        quality_metrics(np.zeros((3, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        quality_metrics(np.zeros((3, 32, 32), np.uint8))
    with pytest.raises(ValueError, match="SSIM window"):
        quality_metrics(np.zeros((3, 8, 32, 3), np.uint8))
