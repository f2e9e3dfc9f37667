"""MP4 encoding through ffmpeg (ffmpeg-python): frame-rate conversion, upscale, H.264.

The model renders at its native size and frame rate; this second stage converts the
frame rate with motion interpolation (`minterpolate`), upscales to the output size
(lanczos) and encodes H.264 / yuv420p with `+faststart`, so players can start before the
whole file arrives. The file is written next to its destination and renamed into place:
a failed encode never leaves half a file behind.

Speed: ffmpeg's motion-compensated interpolation (`mci`) is single-threaded and dominates
post-processing (11.8 s for 81 frames at 832x480 on an H100 host). It is run in parallel over
time chunks, one ffmpeg per chunk: each chunk sees a few frames of its neighbours (a run-in for
its motion search) and keeps exactly the output frames it owns, placed on the global output clock. The chunks' frames then go through one final graph (scale,
later filters, encoder). x264 and the chunk count use the replica's CPUs; H.264 is encoded by
`h264_nvenc` where ffmpeg can open it (GPUs with NVENC: L4, L40S; not A100/H100).
"""

from __future__ import annotations

import functools
import os
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import ffmpeg
import numpy as np

from ..errors import GenerationCancelled, VidgenError
from .controls import camera_move


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
    threads: int = 0  # CPU threads for interpolation chunks and x264; 0 = `available_cpus()`
    encoder: str = "libx264"  # or "h264_nvenc" (see `select_h264_encoder`)
    camera_motion: str = "static"  # camera move on the output clock (`media.controls`); static = none
    color_temperature: int | None = None  # Kelvin of the colour grade (`media.controls`); None = no grade
    deflicker_size: int = 0  # frames of the deflicker window (`media.controls`); 0 = no deflicker

    @property
    def workers(self) -> int:
        return self.threads or available_cpus()


def available_cpus() -> int:
    """CPUs the encoder (x264, interpolation chunks) should use: Ray's OMP_NUM_THREADS (set from a
    replica's num_cpus), but at least two where the process may run on two cores; else its affinity.

    A fractional CPU share (the CPU profile's stage replicas ask for 0.1-0.2) rounds to one torch
    thread, and the encoder followed it: x264 on one thread has no frame parallelism, and it ran
    ~10-25 % slower in a Decoder replica than in process on the same machine. While ffmpeg runs,
    the replica's own threads wait for it, and the replica is niced (`stage_nice`), so a second
    encoder thread takes only what the node has spare. Whole-CPU shares (GPU profiles: 4) are
    unchanged."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        return max(int(omp), min(2, cores))
    return cores


def interpolation_filter(stream, settings: EncodeSettings):
    """Frame-rate conversion from `in_fps` to `out_fps` (minterpolate, `settings.interpolation` mode)."""
    return stream.filter("minterpolate", fps=settings.out_fps, mi_mode=settings.interpolation)


def post_process(stream, width: int, height: int, settings: EncodeSettings, interpolate: bool = True):
    """The post-processing filter chain applied to the decoded frames, in order.

    One place to add filters: frame-rate conversion (unless the frames were already
    interpolated in chunks, `interpolate=False`), deflicker and colour grade (creative
    controls, at the native size where they are cheaper), then the upscale to the output size.
    Filters added after the interpolation see frames on the output clock (`out_fps`).
    """
    if interpolate and settings.out_fps != settings.in_fps:
        stream = interpolation_filter(stream, settings)
    if settings.deflicker_size:
        stream = stream.filter("deflicker", size=settings.deflicker_size, mode="am")
    if settings.color_temperature is not None:
        stream = stream.filter("colortemperature", temperature=settings.color_temperature)
    if (width, height) != (settings.out_width, settings.out_height):
        stream = stream.filter("scale", settings.out_width, settings.out_height, flags="lanczos")
    return stream


# x264 preset -> NVENC preset (p1 fastest .. p7 best).
_NVENC_PRESETS = {"ultrafast": "p1", "superfast": "p2", "veryfast": "p2", "faster": "p3", "fast": "p3",
                  "medium": "p4", "slow": "p5", "slower": "p6", "veryslow": "p7", "placebo": "p7"}


def h264_encoder_args(settings: EncodeSettings) -> dict:
    """ffmpeg output options of the H.264 encoder: libx264 (threads sized to the replica) or NVENC."""
    if settings.encoder == "h264_nvenc":
        return {"vcodec": "h264_nvenc", "preset": _NVENC_PRESETS.get(settings.preset, "p4"), "rc": "vbr",
                "cq": settings.crf, "b:v": 0}
    return {"vcodec": "libx264", "preset": settings.preset, "crf": settings.crf, "threads": settings.workers}


def build_stream(width: int, height: int, settings: EncodeSettings, target: str, encode: bool = True,
                 interpolate: bool = True):
    """The ffmpeg-python graph: rawvideo on stdin -> `post_process` -> H.264 MP4.

    `encode=False` ends the graph in a null sink instead (the benchmark uses it to time
    post-processing apart from the H.264 encode). `interpolate=False`: the frames on stdin
    are already at `out_fps` (interpolated in chunks by `interpolate_chunked`).
    """
    stream = ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{width}x{height}",
                          framerate=settings.in_fps if interpolate else settings.out_fps)
    stream = post_process(stream, width, height, settings, interpolate)
    if not encode:
        return stream.output("-", format="null", vframes=settings.out_frames)
    return stream.output(
        target,
        format="mp4",
        pix_fmt="yuv420p",
        r=settings.out_fps,
        vframes=settings.out_frames,
        movflags="+faststart",
        **h264_encoder_args(settings),
    )


@functools.cache
def nvenc_usable() -> bool:
    """Whether ffmpeg can open `h264_nvenc` here (probed once per process with a tiny real encode).

    The encoder being compiled in is not enough: A100 and H100 have no NVENC engine, and
    machines without an NVIDIA driver can't open it either.
    """
    cmd = [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i",
           "color=c=black:s=256x256:d=0.1", "-frames:v", "2", "-c:v", "h264_nvenc", "-f", "null", "-"]
    try:
        return subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def select_h264_encoder(choice: str) -> str:
    """The encoder for a profile's `video_encoder`: 'auto' = h264_nvenc where usable, else libx264.

    Raises:
        ValueError: 'h264_nvenc' asked for explicitly and ffmpeg cannot open it here.
    """
    if choice == "libx264":
        return "libx264"
    if nvenc_usable():
        return "h264_nvenc"
    if choice == "h264_nvenc":
        raise ValueError("video_encoder='h264_nvenc': ffmpeg cannot open NVENC on this machine (no NVIDIA video "
                         "encoder: A100/H100 have none, or no driver); valid values here: ['auto', 'libx264']")
    return "libx264"


# Interpolation chunks: each owns at least MIN_CHUNK_OUTPUT_FRAMES output frames and sees
# CHUNK_RUN_IN_FRAMES input frames before them. minterpolate's motion search starts from the
# previous frame's vectors, so a chunk's first frames can pick other (equally good) vectors than
# one long run: with this run-in, at 832x480 a few blocks after the joins differ (~0.1% of pixels),
# with the same error against the true frames (benchmarks/postprocess.py, tests/media/test_postprocess.py).
MIN_CHUNK_OUTPUT_FRAMES = 12
CHUNK_RUN_IN_FRAMES = 8
CHUNK_TAIL_FRAMES = 2  # minterpolate interpolates between the two frames around an instant and looks one further


def interpolation_chunks(num_in: int, settings: EncodeSettings, workers: int) -> list[tuple[int, int, int, int]]:
    """Split the output frames into `(in_start, in_end, out_start, out_end)` chunks, one per worker.

    Output frame n is at time n / out_fps; the chunk owning outputs [out_start, out_end) gets
    the input frames covering those instants, `CHUNK_RUN_IN_FRAMES` before and `CHUNK_TAIL_FRAMES` after.
    """
    out_frames = settings.out_frames
    count = max(1, min(workers, out_frames // MIN_CHUNK_OUTPUT_FRAMES))
    bounds = [round(i * out_frames / count) for i in range(count + 1)]
    chunks = []
    for out_start, out_end in zip(bounds, bounds[1:]):
        first = (out_start * settings.in_fps) // settings.out_fps
        last = -(-((out_end - 1) * settings.in_fps) // settings.out_fps)  # ceil
        chunks.append((max(0, first - CHUNK_RUN_IN_FRAMES), min(num_in, last + CHUNK_TAIL_FRAMES + 1),
                       out_start, out_end))
    return chunks


def _chunk_stream(width: int, height: int, settings: EncodeSettings, chunk: tuple[int, int, int, int]):
    in_start, _in_end, out_start, out_end = chunk
    stream = ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{width}x{height}",
                          framerate=settings.in_fps)
    # Put the chunk on the global clock, interpolate, keep exactly the output frames it owns.
    stream = stream.filter("setpts", f"PTS+{in_start}/(FRAME_RATE*TB)")
    stream = interpolation_filter(stream, settings)
    stream = stream.filter("trim", start_pts=out_start, end_pts=out_end)
    # passthrough: frames keep their global timestamps (a complex graph would otherwise be re-timed
    # from 0 with duplicated frames).
    return stream.output("pipe:", format="rawvideo", pix_fmt="rgb24", fps_mode="passthrough")


def interpolate_chunked(frames: np.ndarray, settings: EncodeSettings, workers: int | None = None,
                        cancel: threading.Event | None = None) -> np.ndarray:
    """Frame-rate conversion of `frames` to exactly `settings.out_frames` frames, in parallel time chunks.

    `frames` must already be padded (`pad_for_interpolation`). Returns (out_frames, H, W, 3) uint8.

    Raises:
        GenerationCancelled: `cancel` was set (every chunk's ffmpeg is killed).
        RuntimeError: an ffmpeg failed, or a chunk did not produce the frames it owns.
    """
    _, height, width, _ = frames.shape
    chunks = interpolation_chunks(len(frames), settings, workers or settings.workers)
    frame_bytes = width * height * 3
    procs: list = []
    lock = threading.Lock()
    stopped = threading.Event()

    def run(chunk):
        in_start, in_end, out_start, out_end = chunk
        with lock:
            if stopped.is_set():
                raise GenerationCancelled("interpolation cancelled")
            proc = _chunk_stream(width, height, settings, chunk).global_args(
                "-hide_banner", "-loglevel", "error", "-nostdin").run_async(
                cmd=ffmpeg_exe(), pipe_stdin=True, pipe_stdout=True, pipe_stderr=True)
            procs.append(proc)
        out, err = proc.communicate(np.ascontiguousarray(frames[in_start:in_end]).tobytes())
        if stopped.is_set():
            raise GenerationCancelled("interpolation cancelled")
        if proc.returncode != 0:
            raise RuntimeError(f"ffmpeg failed (exit {proc.returncode}): {err.decode(errors='replace')[-2000:]}")
        if len(out) != (out_end - out_start) * frame_bytes:
            raise RuntimeError(f"interpolation chunk {out_start}..{out_end} produced {len(out) // frame_bytes} "
                               f"frames, expected {out_end - out_start}")
        return np.frombuffer(out, np.uint8).reshape(-1, height, width, 3)

    with ThreadPoolExecutor(max_workers=len(chunks), thread_name_prefix="minterpolate") as pool:
        futures = [pool.submit(run, c) for c in chunks]
        try:
            while not all(f.done() for f in futures):
                if any(f.done() and f.exception() is not None for f in futures):
                    break  # one chunk failed: its error is raised below, the others are killed
                if cancel is not None and cancel.is_set():
                    raise GenerationCancelled("encode cancelled")
                time.sleep(0.02)
            return np.concatenate([f.result() for f in futures])
        finally:
            with lock:
                stopped.set()
                for proc in procs:
                    if proc.poll() is None:
                        proc.kill()


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
        interpolate = True
        moving = settings.camera_motion != "static"
        chunked = (settings.interpolation == "mci"
                   and len(interpolation_chunks(len(frames), settings, settings.workers)) > 1)
        if settings.out_fps != settings.in_fps and (moving or chunked):
            # Motion-compensated interpolation is single-threaded in ffmpeg: run it over time chunks.
            # A camera move needs the frames on the output clock (one window per output frame).
            frames, interpolate = interpolate_chunked(frames, settings, cancel=cancel), False
        if moving:
            frames = camera_move(frames, settings.camera_motion, span=settings.out_frames)
        run_ffmpeg(build_stream(width, height, settings, tmp, interpolate=interpolate), frames, cancel)
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return output
