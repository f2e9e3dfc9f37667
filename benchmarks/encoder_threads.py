"""Encoder threads: the same decoded frames encoded with 1 and 2 (or --threads) encoder threads, alternating.

The Decoder replica's encode (frame-rate conversion, post-processing, x264) used to follow Ray's
OMP_NUM_THREADS, which is 1 for the fractional CPU share a CPU-profile replica asks for; in process it
used every core. This isolates that difference from everything else a served request does: one
request of `benchmarks/serving_overhead.py` (tiny profile, 480p x 5 s, seed 1234) is decoded once,
then its frames are encoded `--runs` times per thread count, alternating, torch at one thread.

    .venv/bin/python benchmarks/encoder_threads.py [--runs 6] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import replace

os.environ.setdefault("VIDGEN_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"vidgen-test-cache-{os.getuid()}"))

REQUEST = {"prompt": "a sailing boat on a calm sea at sunset", "style": "realistic", "duration": 5,
           "resolution": "480p", "seed": 1234}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    import torch

    from vidgen_serve.config import AppConfig
    from vidgen_serve.media.mp4 import encode_mp4
    from vidgen_serve.pipeline import VideoPipeline
    from vidgen_serve.plan import build_plan
    from vidgen_serve.request import VideoRequest

    torch.set_num_threads(1)
    config = AppConfig()
    pipe = VideoPipeline(config)
    plan = build_plan(VideoRequest(**REQUEST), config)
    frames = pipe.decoder.decode_latents(plan, pipe.denoiser.denoise(plan, pipe.text_encoder.encode(plan)))
    settings = pipe.decoder.encode_settings(plan)
    print(f"machine: {os.cpu_count()} CPU cores; frames {frames.shape} -> {settings.out_width}x{settings.out_height} "
          f"@ {settings.out_fps} fps; default encoder threads here: {settings.workers}")
    seconds: dict[int, list[float]] = {t: [] for t in args.threads}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            for t in args.threads:
                t0 = time.perf_counter()
                encode_mp4(frames, replace(settings, threads=t), os.path.join(tmp, f"{i}-{t}.mp4"))
                seconds[t].append(time.perf_counter() - t0)
    first = statistics.median(seconds[args.threads[0]])
    for t, values in seconds.items():
        p50 = statistics.median(values)
        print(f"encoder threads {t}: p50 {p50 * 1000:6.0f} ms  (x{p50 / first:.3f})  "
              f"runs {[round(v * 1000) for v in values]}")


if __name__ == "__main__":
    main()
