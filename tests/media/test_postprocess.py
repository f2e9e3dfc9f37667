"""Fast post-processing: motion interpolation in parallel time chunks (exact frame count, seamless
joins, the same frames as one long run), encoder selection (NVENC only where ffmpeg can open it)
and threads sized to the replica."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from vidgen_serve.media.mp4 import (
    MIN_CHUNK_OUTPUT_FRAMES,
    EncodeSettings,
    available_cpus,
    build_stream,
    encode_mp4,
    h264_encoder_args,
    interpolate_chunked,
    interpolation_chunks,
    nvenc_usable,
    pad_for_interpolation,
    select_h264_encoder,
)


def _load_benchmark():
    """benchmarks/postprocess.py (its synthetic moving-disc frames are what the benchmark measures)."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "postprocess.py"
    spec = importlib.util.spec_from_file_location("postprocess_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def moving_discs(n: int, fps: int):
    return _load_benchmark().moving_discs(n, fps, 208, 120)


def settings_for(n_in: int, in_fps: int, out_fps: int, **kw) -> EncodeSettings:
    duration = (n_in - 1) / in_fps
    return EncodeSettings(in_fps=in_fps, out_fps=out_fps, out_width=208, out_height=120,
                          out_frames=round(duration * out_fps), preset="superfast", **kw)


@pytest.mark.parametrize("in_fps,out_fps,n_in,workers", [(16, 30, 41, 3), (8, 30, 25, 2), (16, 60, 33, 4)])
def test_chunks_own_every_output_frame_once(in_fps, out_fps, n_in, workers):
    settings = settings_for(n_in, in_fps, out_fps)
    padded = n_in + 2
    chunks = interpolation_chunks(padded, settings, workers)
    assert len(chunks) == max(1, min(workers, settings.out_frames // MIN_CHUNK_OUTPUT_FRAMES))
    assert chunks[0][2] == 0 and chunks[-1][3] == settings.out_frames
    for (_, _, _, end), (_, _, start, _) in zip(chunks, chunks[1:]):
        assert end == start  # contiguous, no overlap in what is kept
    for in_start, in_end, out_start, out_end in chunks:
        assert 0 <= in_start < in_end <= padded
        # The inputs cover the owned instants with margin on both sides (where the video has frames).
        assert in_start * out_fps <= out_start * in_fps
        assert (in_end - 1) * out_fps >= (out_end - 1) * in_fps or in_end == padded


@pytest.mark.parametrize("in_fps,out_fps,n_in", [(16, 30, 41), (8, 30, 25)])
def test_chunked_mci_is_exact_and_seamless(in_fps, out_fps, n_in):
    frames = pad_for_interpolation(moving_discs(n_in, in_fps), None)
    settings = settings_for(n_in, in_fps, out_fps)
    single = interpolate_chunked(frames, settings, workers=1)  # one chunk: one ffmpeg over the whole clip
    chunked = interpolate_chunked(frames, settings, workers=3)
    joins = [c[2] for c in interpolation_chunks(len(frames), settings, 3)[1:]]
    assert joins, "the clip must be long enough for several chunks"
    assert single.shape == chunked.shape == (settings.out_frames, 120, 208, 3)
    # The same quality as one long run, against the true frames at the output instants ...
    truth = moving_discs(settings.out_frames, out_fps).astype(int)
    error_single = np.abs(single.astype(int) - truth).mean()
    assert np.abs(chunked.astype(int) - truth).mean() <= error_single * 1.01 + 0.01
    assert error_single < 3  # real interpolation (nearest-frame repeats would be far off)
    # ... practically the same frames (the motion search may pick another equally good vector) ...
    assert (single != chunked).any(axis=-1).mean() < 0.001
    # ... and the joins are continuous: the change across a join is like the change between any two frames.
    steps = np.abs(np.diff(chunked.astype(int), axis=0)).mean(axis=(1, 2, 3))
    for join in joins:
        assert steps[join - 1] <= 2 * np.median(steps) + 1


def test_encode_mp4_with_chunks_matches_one_thread(tmp_path, probe_mp4):
    frames = moving_discs(41, 16)
    one = settings_for(41, 16, 30, threads=1)
    many = settings_for(41, 16, 30, threads=3)
    assert len(interpolation_chunks(len(frames) + 2, many, many.workers)) == 3
    a = probe_mp4(encode_mp4(frames, one, tmp_path / "one.mp4"))
    b = probe_mp4(encode_mp4(frames, many, tmp_path / "many.mp4"))
    assert a["num_frames"] == b["num_frames"] == one.out_frames
    assert b["fps"] == 30 and b["codec"] == "h264"
    assert np.abs(a["frames"].astype(int) - b["frames"].astype(int)).mean() < 1.0  # x264 threads only


def test_blend_runs_in_the_single_graph(tmp_path, probe_mp4):
    settings = settings_for(41, 16, 30, interpolation="blend", threads=4)
    info = probe_mp4(encode_mp4(moving_discs(41, 16), settings, tmp_path / "v.mp4"))
    assert info["num_frames"] == settings.out_frames
    assert "minterpolate=fps=30:mi_mode=blend" in " ".join(build_stream(208, 120, settings, "x.mp4").compile())


def test_threads_follow_the_replica(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "6")  # what Ray sets for a replica with num_cpus=6
    assert available_cpus() == 6
    settings = settings_for(41, 16, 30)
    assert h264_encoder_args(settings)["threads"] == 6
    assert h264_encoder_args(settings_for(41, 16, 30, threads=3))["threads"] == 3
    # A fractional share (Ray sets 1) still gets two encoder threads where two cores are there.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert available_cpus() == 2
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0})
    assert available_cpus() == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2})
    assert available_cpus() == 3


def test_nvenc_is_used_only_where_ffmpeg_can_open_it():
    # This machine has no NVIDIA encoder: the probe (a real 2-frame encode) fails and auto picks x264.
    assert nvenc_usable() is False
    assert select_h264_encoder("auto") == "libx264"
    assert select_h264_encoder("libx264") == "libx264"
    with pytest.raises(ValueError, match=r"video_encoder='h264_nvenc'.*valid values here: \['auto', 'libx264'\]"):
        select_h264_encoder("h264_nvenc")
    args = h264_encoder_args(settings_for(41, 16, 30, encoder="h264_nvenc", crf=23))
    assert args == {"vcodec": "h264_nvenc", "preset": "p2", "rc": "vbr", "cq": 23, "b:v": 0}


def test_decoder_refuses_nvenc_before_loading(checkpoint):
    from vidgen_serve.config import AppConfig
    from vidgen_serve.errors import VidgenError
    from vidgen_serve.pipeline import Decoder

    with pytest.raises(VidgenError) as info:
        Decoder(AppConfig(profile_overrides={"video_encoder": "h264_nvenc"}), checkpoint)
    assert info.value.code == "invalid_profile" and "video_encoder='h264_nvenc'" in info.value.message
