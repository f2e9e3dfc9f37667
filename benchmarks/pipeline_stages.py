"""Per-stage timing of the in-process pipeline (what one request costs, stage by stage).

Loads `VideoPipeline` once, warms every stage up once, then for each case (tiny profile:
480p x 5 s and 1080p x 8 s, seeded) times

  text encode   UMT5 on the prompt and the negative prompt (the embedding cache is off,
                so every repetition runs the encoder)
  denoise       the Wan transformer sampling loop (CFG batched, all sliding windows)
  VAE decode    latents -> native frames
  post-process  frame-rate conversion (minterpolate) + lanczos upscale, ffmpeg into a
                null sink: `build_stream(..., encode=False)` run with `run_ffmpeg`
  MP4 encode    full `encode_mp4` time (post-process + H.264 + mux) minus post-process

Each measurement is repeated (default 3 times) and the median is reported, with each
stage's share of the summed medians. "CPU s" is the median CPU time (user + system of this
process and of ffmpeg) spent in the stage: on a busy machine wall time includes waiting
for a core, CPU time does not.

Run: ``python benchmarks/pipeline_stages.py`` (``--reps N``, ``--json out.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

CASES = [
    {"name": "480p x 5 s", "duration": 5, "resolution": "480p"},
    {"name": "1080p x 8 s", "duration": 8, "resolution": "1080p"},
]
PROMPT = "一只橘猫在樱花树下追逐蝴蝶"
SEED = 20240601
STAGES = ["text encode", "denoise", "VAE decode", "post-process", "MP4 encode"]


def _cpu_seconds() -> float:
    """User + system CPU of this process and its finished children (ffmpeg)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - t0, result


def _timed_cpu(fn, *args, **kwargs):
    """(wall seconds, CPU seconds, result)."""
    c0, t0 = _cpu_seconds(), time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - t0, _cpu_seconds() - c0, result


def measure_case(pipeline, config, case: dict, reps: int, workdir: str) -> dict:
    from vidgen_serve.media.mp4 import (
        build_stream,
        encode_mp4,
        pad_for_interpolation,
        run_ffmpeg,
    )
    from vidgen_serve.plan import build_plan
    from vidgen_serve.request import VideoRequest

    request = VideoRequest(prompt=PROMPT, style="realistic", duration=case["duration"],
                           resolution=case["resolution"], seed=SEED)
    plan = build_plan(request, config)
    settings = pipeline.decoder.encode_settings(plan)
    output = os.path.join(workdir, "bench.mp4")
    samples: dict[str, list[float]] = {stage: [] for stage in STAGES if stage != "MP4 encode"}
    cpu: dict[str, list[float]] = {stage: [] for stage in samples}
    full_encode: list[float] = []
    full_encode_cpu: list[float] = []

    def record(stage, fn, *args):
        wall, cpu_s, result = _timed_cpu(fn, *args)
        samples[stage].append(wall)
        cpu[stage].append(cpu_s)
        return result

    for _ in range(reps):
        embeddings = record("text encode", pipeline.text_encoder.encode, plan)
        assert embeddings.cache_hits == 0, "the text cache must be off for this benchmark"
        latents = record("denoise", pipeline.denoiser.denoise, plan, embeddings)
        frames = record("VAE decode", pipeline.decoder.decode_latents, plan, latents)
        _, height, width, _ = frames.shape
        null_graph = build_stream(width, height, settings, "-", encode=False)
        record("post-process", run_ffmpeg, null_graph, pad_for_interpolation(frames, settings))
        wall, cpu_s, _ = _timed_cpu(encode_mp4, frames, settings, output)
        full_encode.append(wall)
        full_encode_cpu.append(cpu_s)
    medians = {stage: statistics.median(values) for stage, values in samples.items()}
    medians["MP4 encode"] = max(0.0, statistics.median(full_encode) - medians["post-process"])
    cpu_medians = {stage: statistics.median(values) for stage, values in cpu.items()}
    cpu_medians["MP4 encode"] = max(0.0, statistics.median(full_encode_cpu) - cpu_medians["post-process"])
    return {
        "case": case["name"],
        "plan": plan.summary(),
        "median_s": {stage: medians[stage] for stage in STAGES},
        "median_cpu_s": {stage: cpu_medians[stage] for stage in STAGES},
        "samples_s": {**samples, "encode_mp4 (full)": full_encode},
        "samples_cpu_s": {**cpu, "encode_mp4 (full)": full_encode_cpu},
        "total_s": sum(medians.values()),
        "total_cpu_s": sum(cpu_medians.values()),
    }


def print_table(result: dict) -> None:
    plan = result["plan"]
    print(f"\n{result['case']}: native {plan['native']}, {plan['frames']} frames, "
          f"{len(plan['windows'])} window(s), {plan['steps']} steps -> {plan['output']}, "
          f"{plan['output_frames']} frames")
    print(f"  {'stage':<14}{'median s':>10}{'share':>9}{'CPU s':>9}")
    total = result["total_s"]
    for stage in STAGES:
        seconds = result["median_s"][stage]
        print(f"  {stage:<14}{seconds:>10.3f}{100 * seconds / total:>8.1f}%{result['median_cpu_s'][stage]:>9.2f}")
    print(f"  {'total':<14}{total:>10.3f}{100.0:>8.1f}%{result['total_cpu_s']:>9.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--reps", type=int, default=3, help="repetitions per case (median reported)")
    parser.add_argument("--json", help="also write the results (all samples) to this file")
    args = parser.parse_args(argv)

    import torch

    from vidgen_serve.config import AppConfig
    from vidgen_serve.pipeline import VideoPipeline
    from vidgen_serve.plan import build_plan
    from vidgen_serve.request import VideoRequest

    # text_cache_size=0: every repetition runs the text encoder (a cache hit would time a dict lookup).
    config = AppConfig(profile=args.profile, profile_overrides={"text_cache_size": 0})
    t_load, pipeline = _timed(VideoPipeline, config)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads); profile {config.profile}; "
          f"pipeline load {t_load:.2f}s")
    print(f"medians of {args.reps} runs; post-process = minterpolate + scale into a null sink "
          f"(build_stream(encode=False) via run_ffmpeg); MP4 encode = full encode_mp4 time - post-process; "
          f"load average at start {os.getloadavg()[0]:.1f}")

    results = []
    with tempfile.TemporaryDirectory(prefix="vidgen-bench-") as workdir:
        # One warm-up generation through every stage (first-call allocations, ffmpeg start).
        warm = build_plan(VideoRequest(prompt=PROMPT, duration=1, resolution="480p", seed=SEED), config)
        t_warm, _ = _timed(pipeline.generate, warm, os.path.join(workdir, "warmup.mp4"))
        print(f"warm-up (480p x 1 s): {t_warm:.2f}s")
        for case in CASES:
            result = measure_case(pipeline, config, case, args.reps, workdir)
            print_table(result)
            results.append(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu_count": os.cpu_count(), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
