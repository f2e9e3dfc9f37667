"""MP4 encoding through ffmpeg (ffmpeg-python): frame-rate conversion, upscale, H.264.

The model renders at its native size and frame rate; this second stage converts the
frame rate with motion interpolation (`minterpolate`), upscales to the output size
(lanczos) and encodes H.264 / yuv420p with `+faststart`, so players can start before the
whole file arrives. The file is written next to its destination and renamed into place:
a failed encode never leaves half a file behind.
"""

from __future__ import annotations

import os
import secrets
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import ffmpeg
import numpy as np

from ..errors import GenerationCancelled, VidgenError


def ffmpeg_exe() -> str:
    """The ffmpeg binary: a system one if present, else the one shipped by imageio-ffmpeg."""
    system = shutil.which("ffmpeg")
    if system:
        return system
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


@dataclass(frozen=True)
class EncodeSettings:
    """How native frames become the output video."""

    in_fps: int
    out_fps: int
    out_width: int
    out_height: int
    out_frames: int
    preset: str = "veryfast"
    crf: int = 20
    interpolation: str = "mci"


def build_stream(width: int, height: int, settings: EncodeSettings, target: str, encode: bool = True):
    """The ffmpeg-python graph: rawvideo on stdin -> minterpolate -> scale -> H.264 MP4.

    `encode=False` ends the graph in a null sink instead (the benchmark uses it to time
    post-processing apart from the H.264 encode).
    """
    stream = ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{width}x{height}",
                          framerate=settings.in_fps)
    if settings.out_fps != settings.in_fps:
        stream = stream.filter("minterpolate", fps=settings.out_fps, mi_mode=settings.interpolation)
    if (width, height) != (settings.out_width, settings.out_height):
        stream = stream.filter("scale", settings.out_width, settings.out_height, flags="lanczos")
    if not encode:
        return stream.output("-", format="null", vframes=settings.out_frames)
    return stream.output(
        target,
        format="mp4",
        vcodec="libx264",
        pix_fmt="yuv420p",
        preset=settings.preset,
        crf=settings.crf,
        r=settings.out_fps,
        vframes=settings.out_frames,
        movflags="+faststart",
    )


def run_ffmpeg(stream, frames: np.ndarray, cancel: threading.Event | None = None) -> None:
    """Feed `frames` (N, H, W, 3) uint8 to the graph's stdin; raise with ffmpeg's stderr on failure.

    Args:
        stream: an ffmpeg-python output stream (see `build_stream`).
        frames: the native frames.
        cancel: when set (e.g. the request's deadline passed), ffmpeg is killed and
            `GenerationCancelled` raised, between frames or while ffmpeg finishes.
    """
    proc = stream.global_args("-hide_banner", "-loglevel", "error", "-nostdin").overwrite_output().run_async(
        cmd=ffmpeg_exe(), pipe_stdin=True, pipe_stderr=True
    )
    # stderr is drained on a thread: a chatty ffmpeg must never block on a full pipe.
    stderr_chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: stderr_chunks.append(proc.stderr.read()), daemon=True)
    reader.start()
    try:
        for frame in np.ascontiguousarray(frames, dtype=np.uint8):
            if cancel is not None and cancel.is_set():
                break
            proc.stdin.write(frame.tobytes())
        proc.stdin.close()
    except BrokenPipeError:
        pass  # ffmpeg died; its stderr says why
    while proc.poll() is None:
        if cancel is not None and cancel.is_set():
            proc.kill()
            proc.wait()
            raise GenerationCancelled("encode cancelled")
        time.sleep(0.02)
    reader.join(timeout=5)
    if proc.returncode != 0:
        if cancel is not None and cancel.is_set():
            raise GenerationCancelled("encode cancelled")
        stderr = b"".join(stderr_chunks).decode(errors="replace")
        raise RuntimeError(f"ffmpeg failed (exit {proc.returncode}): {stderr.strip()[-2000:]}")


def pad_for_interpolation(frames: np.ndarray, settings: EncodeSettings) -> np.ndarray:
    """Repeat the last frame so interpolation yields at least `out_frames` frames.

    minterpolate stops a few output frames short of the input's end (it needs a frame
    after each interpolated instant); the native clip covers the duration exactly, so two
    extra copies of the last frame make up for it. `vframes` then cuts at the exact count.
    """
    return np.concatenate([frames, np.repeat(frames[-1:], 2, axis=0)]) if len(frames) else frames


def encode_mp4(frames: np.ndarray, settings: EncodeSettings, output_path: str | os.PathLike,
               cancel: threading.Event | None = None) -> Path:
    """Write `frames` (N, H, W, 3) uint8 at `settings.in_fps` as the output MP4, atomically.

    Raises:
        VidgenError: the output location can't be written.
        RuntimeError: ffmpeg failed.
    """
    output = Path(output_path)
    directory = output.parent if str(output.parent) else Path(".")
    if not directory.is_dir() or not os.access(directory, os.W_OK):
        raise VidgenError(400, f"output directory {str(directory)!r} does not exist or is not writable",
                          code="output_not_writable")
    # Created like any new file (mode 0666 less the umask), not mkstemp's 0600: the MP4 is
    # renamed into place and must be as readable as the user's other files.
    tmp = str(directory / f".{output.name}.{secrets.token_hex(8)}.part")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        _, height, width, _ = frames.shape
        frames = pad_for_interpolation(frames, settings)
        run_ffmpeg(build_stream(width, height, settings, tmp), frames, cancel)
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return output
