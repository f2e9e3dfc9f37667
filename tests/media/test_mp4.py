"""MP4 encoding: H.264/yuv420p, size, rate, exact frame count, +faststart, atomic writes."""

from __future__ import annotations

import os

import numpy as np
import pytest

from vidgen_serve.errors import VidgenError
from vidgen_serve.media.mp4 import EncodeSettings, build_stream, encode_mp4, run_ffmpeg


def moving_square(n: int, width: int = 112, height: int = 64) -> np.ndarray:
    """n frames of a bright square moving over a gradient: content the encoder must keep."""
    frames = np.zeros((n, height, width, 3), np.uint8)
    frames[..., 2] = np.linspace(0, 255, width, dtype=np.uint8)[None, None, :]
    for i in range(n):
        x = (i * 5) % (width - 16)
        frames[i, 24:40, x : x + 16] = 255
    return frames


@pytest.mark.parametrize(
    "in_fps,out_fps,size,n_in,duration",
    [
        (8, 30, (854, 480), 17, 2.0),  # interpolate 8 -> 30, upscale 16:9
        (8, 15, (480, 854), 9, 1.0),  # 9:16
        (8, 24, (480, 480), 21, 2.5),  # 1:1, fractional duration
        (8, 8, (112, 64), 9, 1.0),  # no conversion at all
    ],
)
def test_encode_mp4_properties(tmp_path, probe_mp4, in_fps, out_fps, size, n_in, duration):
    out_frames = round(duration * out_fps)
    settings = EncodeSettings(in_fps=in_fps, out_fps=out_fps, out_width=size[0], out_height=size[1],
                              out_frames=out_frames, preset="superfast", crf=20)
    path = encode_mp4(moving_square(n_in), settings, tmp_path / "v.mp4")
    assert path == tmp_path / "v.mp4"
    info = probe_mp4(path)
    assert info["codec"] == "h264"
    assert info["pix_fmt"] == "yuv420p"
    assert (info["width"], info["height"]) == size
    assert info["fps"] == out_fps
    assert info["num_frames"] == out_frames
    assert info["duration_s"] == pytest.approx(duration, abs=1.0 / out_fps)
    # +faststart: the index (moov) comes before the media data (mdat).
    assert info["boxes"][0] == "ftyp"
    assert info["boxes"].index("moov") < info["boxes"].index("mdat")
    # Nothing but the output in the directory (the .part temp file was renamed into place).
    assert os.listdir(tmp_path) == ["v.mp4"]


def test_encoded_content_follows_the_input(tmp_path, probe_mp4):
    frames = moving_square(9)
    settings = EncodeSettings(in_fps=8, out_fps=8, out_width=112, out_height=64, out_frames=9, preset="superfast",
                              crf=10)
    decoded = probe_mp4(encode_mp4(frames, settings, tmp_path / "v.mp4"))["frames"]
    assert decoded.shape == frames.shape
    # Lossy, but close to the source (yuv420p chroma subsampling blurs the square's edges).
    assert np.abs(decoded.astype(int) - frames.astype(int)).mean() < 8


def test_failed_encode_leaves_nothing_behind(tmp_path):
    (tmp_path / "other.txt").write_text("keep me")
    settings = EncodeSettings(in_fps=8, out_fps=15, out_width=854, out_height=480, out_frames=15,
                              preset="no-such-preset")
    with pytest.raises(RuntimeError, match="ffmpeg failed"):
        encode_mp4(moving_square(9), settings, tmp_path / "v.mp4")
    assert sorted(os.listdir(tmp_path)) == ["other.txt"]  # no v.mp4, no .v.mp4.*.part


def test_failed_encode_keeps_an_existing_output(tmp_path):
    target = tmp_path / "v.mp4"
    target.write_bytes(b"previous video")
    settings = EncodeSettings(in_fps=8, out_fps=8, out_width=112, out_height=64, out_frames=9, preset="bogus")
    with pytest.raises(RuntimeError):
        encode_mp4(moving_square(9), settings, target)
    assert target.read_bytes() == b"previous video"
    assert os.listdir(tmp_path) == ["v.mp4"]


def test_unwritable_output_directory(tmp_path):
    settings = EncodeSettings(in_fps=8, out_fps=8, out_width=112, out_height=64, out_frames=9)
    with pytest.raises(VidgenError) as info:
        encode_mp4(moving_square(9), settings, tmp_path / "missing" / "v.mp4")
    assert info.value.code == "output_not_writable"
    assert "missing" in info.value.message
    assert os.listdir(tmp_path) == []


def test_null_sink_runs_post_processing_without_writing(tmp_path):
    settings = EncodeSettings(in_fps=8, out_fps=30, out_width=854, out_height=480, out_frames=30)
    target = tmp_path / "never.mp4"
    run_ffmpeg(build_stream(112, 64, settings, str(target), encode=False), moving_square(9))
    assert not target.exists()


def test_cancelled_encode_stops_ffmpeg_and_leaves_nothing(tmp_path):
    """A deadline that passes mid-encode kills ffmpeg: no file, no temp file, a clear error."""
    import threading
    import time

    import numpy as np

    from vidgen_serve.errors import GenerationCancelled
    from vidgen_serve.media.mp4 import EncodeSettings, encode_mp4

    frames = np.random.default_rng(0).integers(0, 255, (65, 64, 112, 3), dtype=np.uint8)
    settings = EncodeSettings(in_fps=8, out_fps=60, out_width=1920, out_height=1080, out_frames=480,
                              preset="medium")
    cancel = threading.Event()
    threading.Timer(0.5, cancel.set).start()
    t0 = time.monotonic()
    with pytest.raises(GenerationCancelled):
        encode_mp4(frames, settings, tmp_path / "out.mp4", cancel)
    assert time.monotonic() - t0 < 5  # the full encode takes far longer on this machine
    assert list(tmp_path.iterdir()) == []
