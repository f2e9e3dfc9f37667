"""Creative controls' model-independent mechanisms, measured on the tiny model at fixed seeds.

motion_intensity (initial-noise correlation), color_palette (colour grade), camera_motion (camera
move on over-scanned frames) and temporal_consistency (window overlap, seam ramp, deflicker), through
the in-process pipeline, on real MP4s probed with PyAV.

Frames of the random tiny VAE: its first five native frames (0.6 s) are a warm-up flash, left out of
the motion measurements. The tiny VAE barely depends on its latents (two independent latent videos
decode to frames ~2/255 apart), so what the denoiser does to the latents is measured on the latents.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vidgen_serve.media.controls import camera_move, color_temperature, deflicker_size
from vidgen_serve.media.mp4 import EncodeSettings, build_stream
from vidgen_serve.pipeline.controls import noise_correlation, seam_ramp
from vidgen_serve.pipeline.denoiser import initial_noise, window_weights
from vidgen_serve.request import VideoRequest

BASE = {"prompt": "a lighthouse on a cliff", "resolution": "480p", "fps": 15, "duration": 3}
WARM_UP_S = 0.8  # the random VAE's first frames


def request(**kw) -> VideoRequest:
    return VideoRequest(**{**BASE, "seed": 7, **kw})


def render(pipeline, probe_mp4, tmp_path, **kw) -> np.ndarray:
    """Generate a video for `request(**kw)`; its MP4's frames (F, H, W, 3) uint8 as PyAV decodes them."""
    req = request(**kw)
    name = "-".join(f"{k}={v}" for k, v in sorted(kw.items())) or "default"
    result = pipeline.generate(req, tmp_path / f"{name}.mp4")
    info = probe_mp4(result.path)
    assert info["num_frames"] == result.plan.output_num_frames
    return info["frames"]


def gray(frames: np.ndarray, pool: int = 4) -> np.ndarray:
    """Luma, averaged over pool x pool blocks (drops the codec's 8-px block grid, keeps the smooth picture)."""
    g = frames.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    f, h, w = g.shape
    return g[:, : h // pool * pool, : w // pool * pool].reshape(f, h // pool, pool, w // pool, pool).mean(axis=(2, 4))


def phase_shift(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(dy, dx) with b(x) ~ a(x - d): phase correlation with a parabolic sub-pixel peak."""
    h, w = a.shape
    window = np.outer(np.hanning(h), np.hanning(w))
    cross = np.conj(np.fft.fft2((a - a.mean()) * window)) * np.fft.fft2((b - b.mean()) * window)
    r = np.fft.ifft2(cross / (np.abs(cross) + 1e-12)).real
    py, px = np.unravel_index(np.argmax(r), r.shape)

    def refine(c: int, n: int, axis: int) -> float:
        lo = r[(c - 1) % n, px] if axis == 0 else r[py, (c - 1) % n]
        hi = r[(c + 1) % n, px] if axis == 0 else r[py, (c + 1) % n]
        den = lo - 2 * r[py, px] + hi
        d = c + (0.5 * (lo - hi) / den if den else 0.0)
        return d - n if d > n / 2 else d

    return refine(py, h, 0), refine(px, w, 1)


def zoom_scale(a: np.ndarray, b: np.ndarray, grid=(3, 4)) -> float:
    """Scale of b against a (> 1: zoom in): tile shifts fitted to d = (s - 1) * (position - centre)."""
    h, w = a.shape
    th, tw = h // grid[0], w // grid[1]
    pos, disp = [], []
    for i in range(grid[0]):
        for j in range(grid[1]):
            tile = (slice(i * th, (i + 1) * th), slice(j * tw, (j + 1) * tw))
            dy, dx = phase_shift(a[tile], b[tile])
            pos += [(i + 0.5) * th - h / 2, (j + 0.5) * tw - w / 2]
            disp += [dy, dx]
    pos, disp = np.array(pos), np.array(disp)
    return 1.0 + float(pos @ disp / (pos @ pos))


def consecutive(frames: np.ndarray, fps: int) -> tuple[np.ndarray, np.ndarray]:
    """Per consecutive pair after the warm-up: (dx, scale)."""
    g = gray(frames)[round(WARM_UP_S * fps):]
    dx = np.array([phase_shift(g[i], g[i + 1])[1] for i in range(len(g) - 1)])
    scale = np.array([zoom_scale(g[i], g[i + 1]) for i in range(len(g) - 1)])
    return dx, scale


# --- motion_intensity -------------------------------------------------------------------------------


def test_motion_noise_keeps_unit_variance_and_the_default_is_the_plain_seeded_noise(pipeline):
    noise = {}
    for intensity in (0.1, 0.5, 1.0, 1.5):
        plan = pipeline.plan(request(motion_intensity=intensity))
        noise[intensity] = initial_noise(plan, 16)
        assert torch.equal(noise[intensity], initial_noise(plan, 16))  # seeded: same every time
        assert abs(noise[intensity].std().item() - 1.0) < 0.05
    assert torch.equal(noise[1.0], torch.randn(noise[1.0].shape, generator=torch.Generator().manual_seed(7)))
    # Correlation of neighbouring frames: high at 0.1, none at 1.0, negative at 1.5.
    for intensity, n in noise.items():
        corr = torch.corrcoef(torch.stack([n[:, :, :-1].flatten(), n[:, :, 1:].flatten()]))[0, 1].item()
        assert abs(corr - noise_correlation(intensity)) < 0.05, (intensity, corr)


@pytest.mark.parametrize("seed", [1, 7, 23])
def test_motion_intensity_orders_the_change_between_denoised_frames(pipeline, seed):
    """Mean |difference| of consecutive latent frames, through the tiny transformer's sampling loop."""
    change = []
    for intensity in (0.1, 0.5, 1.0, 1.5):
        plan = pipeline.plan(request(motion_intensity=intensity, seed=seed))
        latents = pipeline.denoiser.denoise(plan, pipeline.text_encoder.encode(plan))
        change.append(latents.diff(dim=2).abs().mean().item())
    assert change == sorted(change) and change[-1] > 2 * change[0], change


# --- color_palette ----------------------------------------------------------------------------------


def test_color_palette_grades_red_over_blue(pipeline, probe_mp4, tmp_path):
    ratio = {}
    for palette in ("warm", "neutral", "cool"):
        f = render(pipeline, probe_mp4, tmp_path, color_palette=palette).astype(np.float64)
        ratio[palette] = f[..., 0].mean() / f[..., 2].mean()
    assert ratio["warm"] > 1.2 * ratio["neutral"] and ratio["neutral"] > 1.1 * ratio["cool"], ratio


def test_neutral_static_default_graph_is_unchanged(pipeline):
    """The default controls add nothing to the ffmpeg graph or the frames: today's output, bit for bit."""
    plan = pipeline.plan(request())
    settings = pipeline.decoder.encode_settings(plan)
    assert (settings.camera_motion, settings.color_temperature, settings.deflicker_size) == ("static", None, 0)
    plain = EncodeSettings(**{k: v for k, v in settings.__dict__.items()
                              if k not in ("camera_motion", "color_temperature", "deflicker_size")})
    assert build_stream(112, 64, settings, "x.mp4").get_args() == build_stream(112, 64, plain, "x.mp4").get_args()
    frames = np.random.default_rng(0).integers(0, 256, (5, 64, 112, 3), dtype=np.uint8)
    assert camera_move(frames, "static") is frames
    graded = pipeline.decoder.encode_settings(pipeline.plan(request(color_palette="cool")))
    assert "colortemperature=temperature=10000" in " ".join(build_stream(112, 64, graded, "x.mp4").get_args())
    assert color_temperature("warm") < 6500 < color_temperature("cool")


# --- camera_motion ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def camera_videos(pipeline, probe_mp4, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("camera")
    return {motion: render(pipeline, probe_mp4, tmp, camera_motion=motion) for motion in ("static", "pan", "zoom")}


def test_pan_is_a_steady_horizontal_shift(camera_videos):
    dx, scale = consecutive(camera_videos["pan"], BASE["fps"])
    median = np.median(dx)
    assert median < -0.5  # content moves left: the window slides right (0.2 of the width over the clip)
    assert (dx < 0).mean() >= 0.85, dx  # one sign (a few pairs carry a jump of the random content)
    q1, q3 = np.percentile(dx, [25, 75])
    assert q3 - q1 < 0.3 * abs(median), dx  # steady speed
    first, second = np.median(dx[: len(dx) // 2]), np.median(dx[len(dx) // 2:])
    assert abs(first - second) < 0.15 * abs(median), (first, second)
    assert abs(np.median(scale) - 1) < 0.002  # no zoom


def test_zoom_is_a_steady_scale_change(camera_videos):
    dx, scale = consecutive(camera_videos["zoom"], BASE["fps"])
    median = np.median(scale)
    assert median > 1.002, scale  # zooming in: ~0.7 ** (-1/44) = 1.008 per output frame
    assert np.percentile(scale, 25) > 1.0, scale
    first, second = np.median(scale[: len(scale) // 2]), np.median(scale[len(scale) // 2:])
    assert abs(first - second) < 0.5 * (median - 1), (first, second)
    assert abs(np.median(dx)) < 0.2  # no pan


def test_static_shows_neither(camera_videos):
    dx, scale = consecutive(camera_videos["static"], BASE["fps"])
    assert abs(np.median(dx)) < 0.2 and abs(np.median(scale) - 1) < 0.001, (dx, scale)


def test_camera_move_is_one_path_across_interpolation_chunks():
    """Applied on the output clock after the (chunked) interpolation: frame k's window depends on k alone."""
    frames = np.repeat(np.linspace(0, 255, 112, dtype=np.uint8)[None, None, :, None], 64, axis=1)
    frames = np.repeat(np.repeat(frames, 3, axis=3), 9, axis=0)
    moved = camera_move(frames, "pan")
    assert np.array_equal(camera_move(frames[:5], "pan", span=9), moved[:5])  # same windows given fewer frames
    long = np.repeat(frames[:1], 40, axis=0)  # across the resampling batches too
    assert np.array_equal(camera_move(long[:20], "zoom", span=40), camera_move(long, "zoom")[:20])
    # Brightness under the window's centre rises steadily as the window slides right over the ramp.
    centre = moved[:, 32, 56, 0].astype(int)
    assert (np.diff(centre) > 0).all() and np.ptp(np.diff(centre)) <= 2, centre  # uint8 ramp steps


# --- temporal_consistency ---------------------------------------------------------------------------


def seam_ratio(frames: np.ndarray, plan) -> float:
    """Mean |frame difference| across window boundaries / median inside windows (output at 2x native fps)."""
    assert plan.output_fps == 2 * plan.native_fps
    g = frames.astype(np.float64)
    diff = np.abs(np.diff(g, axis=0)).mean(axis=(1, 2, 3))
    boundaries = set()
    for k, win in enumerate(plan.windows):
        edges = ([win.start] if k > 0 else []) + ([win.end] if k < len(plan.windows) - 1 else [])
        for latent in edges:  # latent frame l >= 1 decodes to pixel frames 4l-3 .. 4l
            pixel = 4 * latent - 3
            boundaries.update({2 * pixel - 2, 2 * pixel - 1})  # output pairs spanning pixel-1 -> pixel
    skip = round(WARM_UP_S * plan.output_fps)
    seams = [diff[i] for i in sorted(boundaries) if skip <= i < len(diff)]
    inside = [diff[i] for i in range(skip, len(diff)) if i not in boundaries]
    return float(np.mean(seams) / np.median(inside))


def test_temporal_consistency_mechanisms():
    # More consistency: more overlap (plan), a smoother seam ramp, a longer deflicker window.
    assert torch.equal(seam_ramp(4, 0.85), torch.arange(1, 5, dtype=torch.float32) / 5)  # default: today's ramp
    assert torch.equal(seam_ramp(4, 0.7), seam_ramp(4, 0.85))
    cosine = seam_ramp(6, 1.0)
    assert cosine[0] < seam_ramp(6, 0.85)[0] and torch.allclose(cosine + cosine.flip(0), torch.ones(6))
    assert [deflicker_size(c) for c in (0.7, 0.85, 0.9, 0.95, 1.0)] == [0, 0, 5, 7, 9]
    from vidgen_serve.plan import Window

    windows = [Window(start=0, end=11), Window(start=5, end=16)]
    w0, w1 = window_weights(windows, 6, 1.0)
    assert torch.allclose(w0[5:] + w1[:6], torch.ones(6))  # the ramps still sum to one across the overlap


def test_seam_ratio_at_high_consistency(pipeline, probe_mp4, tmp_path):
    ratios, overlaps = {}, {}
    for consistency in (0.7, 0.9, 1.0):
        req = request(duration=10, fps=16, temporal_consistency=consistency)
        plan = pipeline.plan(req)
        assert len(plan.windows) >= 3
        result = pipeline.generate(plan, tmp_path / f"tc{consistency}.mp4")
        frames = probe_mp4(result.path)["frames"]
        assert len(frames) == plan.output_num_frames
        ratios[consistency], overlaps[consistency] = seam_ratio(frames, plan), plan.overlap_latent_frames
    assert overlaps[0.7] < overlaps[0.9] < overlaps[1.0]
    assert ratios[0.9] <= 1.2 and ratios[1.0] <= 1.2, ratios
