"""Post-processing speed: motion interpolation in parallel time chunks vs one ffmpeg, side by side.

On the same frames (synthetic: discs moving at constant speed over a gradient, 832x480, 81
frames at 16 fps, i.e. one Wan 2.1 window), times

  mci single    minterpolate mi_mode=mci in one ffmpeg (single-threaded: ffmpeg's own speed)
  mci chunked   the same over N parallel time chunks (`interpolate_chunked`, N = CPUs)
  blend         minterpolate mi_mode=blend in one ffmpeg
  1080p encode  the Decoder's whole post-processing of an 8 s video to 1920x1080@30 (129 native
                frames: interpolation + lanczos + x264 medium), chunked and threaded vs 1 thread

and prints the ratios (speed-ups), the interpolation error of both against the true frames at
the output instants (the discs' motion is known) and the share of pixels where they differ.
Ratios, not absolute seconds, are the result: both sides run in the same process, one after the
other. Run: ``python benchmarks/postprocess.py`` (``--small`` for 208x120, ``--json out.json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)


def moving_discs(n: int, fps: int, width: int = 832, height: int = 480):
    """`n` frames (n, height, width, 3) uint8 of discs moving at constant speed, rendered at time i / fps.

    Natural motion for a motion-compensated interpolator (random noise would have no true motion).
    """
    import numpy as np

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    s = width / 208  # scale positions and speeds with the frame size
    discs = [(30, 40, 40, 10, 14, (255, 60, 60)), (150, 80, -30, -8, 18, (60, 255, 90)),
             (100, 30, 15, 25, 10, (250, 250, 40))]
    background = np.zeros((height, width, 3), np.float32)
    background[..., 2] = 255 * x / width
    frames = np.empty((n, height, width, 3), np.uint8)
    for i in range(n):
        t = i / fps
        img = background.copy()
        for cx, cy, vx, vy, r, colour in discs:
            mask = np.clip(r * s + 0.5 - np.hypot(x - (cx + vx * t) * s, y - (cy + vy * t) * s), 0, 1)[..., None]
            img = img * (1 - mask) + np.array(colour, np.float32) * mask
        frames[i] = img.clip(0, 255).astype(np.uint8)
    return frames


def measure(width: int = 832, height: int = 480, frames_in: int = 81, in_fps: int = 16, out_fps: int = 30,
            workers: int | None = None, encode_1080p: bool = True, one_thread_baseline: bool = True) -> dict:
    """Time the post-processing variants on the same frames; returns seconds and ratios."""
    import numpy as np

    from vidgen_serve.media.mp4 import (
        EncodeSettings,
        available_cpus,
        build_stream,
        encode_mp4,
        interpolate_chunked,
        interpolation_chunks,
        pad_for_interpolation,
        run_ffmpeg,
    )

    workers = workers or available_cpus()
    frames = moving_discs(frames_in, in_fps, width, height)
    duration = (frames_in - 1) / in_fps
    settings = EncodeSettings(in_fps=in_fps, out_fps=out_fps, out_width=width, out_height=height,
                              out_frames=round(duration * out_fps), preset="medium", threads=workers)
    padded = pad_for_interpolation(frames, settings)
    result: dict = {"size": f"{width}x{height}", "frames_in": frames_in, "in_fps": in_fps, "out_fps": out_fps,
                    "workers": workers, "chunks": len(interpolation_chunks(len(padded), settings, workers))}

    t0 = time.perf_counter()
    single = interpolate_chunked(padded, settings, workers=1)
    result["mci_single_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    chunked = interpolate_chunked(padded, settings, workers=workers)
    result["mci_chunked_s"] = time.perf_counter() - t0
    result["mci_chunked_speedup"] = result["mci_single_s"] / result["mci_chunked_s"]
    result["mci_frames_exact"] = len(chunked) == settings.out_frames
    # Quality: both against the true frames at the output instants (the discs' motion is known).
    truth = moving_discs(settings.out_frames, out_fps, width, height).astype(np.int16)
    result["mci_single_error"] = float(np.abs(single.astype(np.int16) - truth).mean())
    result["mci_chunked_error"] = float(np.abs(chunked.astype(np.int16) - truth).mean())
    result["mci_chunked_pixels_differing"] = float((single != chunked).any(axis=-1).mean())
    blend = dataclasses.replace(settings, interpolation="blend")
    t0 = time.perf_counter()
    run_ffmpeg(build_stream(width, height, blend, "-", encode=False), padded)
    result["blend_s"] = time.perf_counter() - t0

    if encode_1080p:
        n8 = 8 * in_fps + 1
        clip = moving_discs(n8, in_fps, width, height)
        hd = dict(in_fps=in_fps, out_fps=out_fps, out_width=1920, out_height=1080, out_frames=8 * out_fps,
                  preset="medium")
        with tempfile.TemporaryDirectory() as tmp:
            runs = [("1080p_8s_s", workers)] + ([("1080p_8s_one_thread_s", 1)] if one_thread_baseline else [])
            for name, threads in runs:
                t0 = time.perf_counter()
                encode_mp4(clip, EncodeSettings(**hd, threads=threads), os.path.join(tmp, f"{threads}.mp4"))
                result[name] = time.perf_counter() - t0
        if one_thread_baseline:
            result["1080p_8s_speedup"] = result["1080p_8s_one_thread_s"] / result["1080p_8s_s"]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="208x120 frames, no 1080p encode (a quick look)")
    parser.add_argument("--workers", type=int, help="parallel chunks / x264 threads (default: this process's CPUs)")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()
    size = dict(width=208, height=120, encode_1080p=False) if args.small else {}
    result = measure(workers=args.workers, **size)
    result["machine"] = {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                         "load_average": os.getloadavg()}
    print(json.dumps(result, indent=2))
    print(f"\nmci over {result['chunks']} chunks: {result['mci_chunked_speedup']:.2f}x faster than one ffmpeg "
          f"(error vs true frames {result['mci_chunked_error']:.3f} vs {result['mci_single_error']:.3f}; "
          f"{result['mci_chunked_pixels_differing']:.4%} of pixels differ); blend is "
          f"{result['mci_single_s'] / result['blend_s']:.1f}x faster than single mci", file=sys.stderr)
    if "1080p_8s_speedup" in result:
        print(f"1080p 8 s post-processing: {result['1080p_8s_s']:.1f}s with {result['workers']} workers, "
              f"{result['1080p_8s_speedup']:.2f}x faster than 1 thread", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
