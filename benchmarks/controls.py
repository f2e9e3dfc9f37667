"""Creative controls: cost per second of output by duration, and the post-processing controls' cost.

Loads `VideoPipeline` once (tiny profile by default), warms every stage up, then

1. Generates 720p videos of 5, 10 and 15 s (seeded, whole pipeline: text encode, denoise over the
   sliding windows, VAE decode, post-process + MP4) and reports the seconds of compute per second of
   output, wall and CPU (user + system of this process and of ffmpeg), and the ratio of the
   per-second cost at 15 s to that at 5 s (goal: <= 1.15, the sliding windows scale linearly).
2. On the native frames of the 5 s case, times the MP4 encode with each post-processing control on
   (colour grade `color_palette=warm`, camera move `camera_motion=pan`, deflicker
   `temporal_consistency=1.0`) against the encode without it, and the quality metrics
   (`vidgen_serve.media.quality.quality_metrics` on the native frames, as the Decoder runs it, "n/a" where that module is
   not installed), each relative to the VAE decode stage of the same case.

3. (Not with --quick.) The denoiser's FLOPs per second of output at 5, 10 and 15 s on the real Wan 2.1
   1.3B and 14B architectures (counted on meta tensors: no weights, no GPU), with overlapping and with
   shifted windows (`window_schedule`): on a GPU the denoiser is compute-bound, so this is its cost
   ratio at any step count, where the timed tiny profile's is mostly the decoder's.

Every measurement is the median of `--reps` runs, taken round-robin over the cases (the machine's
load changes hit every case alike); CPU seconds are the steadier measure on a shared machine. Ratios are printed side by side as
``ratio <name>: <value>`` lines (the smoke test parses them).

Run: ``python benchmarks/controls.py`` (``--reps N``, ``--json out.json``; ``--quick``: 480p,
1/2/3 s, one run each, a smoke check that every part runs).
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

PROMPT = "一只橘猫在樱花树下追逐蝴蝶"
SEED = 20240601
GOAL_LONG_OVER_SHORT = 1.15
CONTROLS = {  # name -> request field that turns it on
    "grade": {"color_palette": "warm"},
    "camera move": {"camera_motion": "pan"},
    "deflicker": {"temporal_consistency": 1.0},
}


def _cpu_seconds() -> float:
    """User + system CPU of this process and its finished children (ffmpeg)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _timed_cpu(fn, *args, **kwargs):
    """(wall seconds, CPU seconds, result)."""
    c0, t0 = _cpu_seconds(), time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - t0, _cpu_seconds() - c0, result


def _median(samples: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(s[0] for s in samples), statistics.median(s[1] for s in samples)


def per_second_cost(pipeline, config, durations: list[float], resolution: str, reps: int, workdir: str) -> dict:
    """{duration: {"wall_s", "cpu_s", "wall_per_s", "cpu_per_s", "windows"}} of whole generations."""
    from vidgen_serve.plan import build_plan
    from vidgen_serve.request import VideoRequest

    plans = {d: build_plan(VideoRequest(prompt=PROMPT, duration=d, resolution=resolution, seed=SEED), config)
             for d in durations}
    samples: dict[float, list[tuple[float, float]]] = {d: [] for d in durations}
    for _ in range(reps):  # round-robin: a change of the machine's load hits every duration alike
        for duration, plan in plans.items():
            wall, cpu, _ = _timed_cpu(pipeline.generate, plan, os.path.join(workdir, f"d{duration}.mp4"))
            samples[duration].append((wall, cpu))
    rows = {}
    for duration, plan in plans.items():
        wall, cpu = _median(samples[duration])
        rows[duration] = {"wall_s": wall, "cpu_s": cpu, "wall_per_s": wall / duration, "cpu_per_s": cpu / duration,
                          "windows": len(plan.windows), "output": f"{plan.output_width}x{plan.output_height}"}
    return rows


def control_costs(pipeline, config, duration: float, resolution: str, reps: int, workdir: str) -> dict:
    """Seconds (wall, CPU) of the VAE decode, the plain encode, each control's extra encode time, the metrics."""
    from vidgen_serve.plan import build_plan
    from vidgen_serve.request import VideoRequest

    def plan_for(**kw):
        return build_plan(VideoRequest(prompt=PROMPT, duration=duration, resolution=resolution, seed=SEED, **kw),
                          config)

    plain = plan_for()
    latents = pipeline.denoiser.denoise(plain, pipeline.text_encoder.encode(plain))
    frames = pipeline.decoder.decode_latents(plain, latents)
    output = os.path.join(workdir, "controls.mp4")
    plans = {"encode": plain, **{name: plan_for(**fields) for name, fields in CONTROLS.items()}}
    samples: dict[str, list[tuple[float, float]]] = {"vae_decode": [], **{name: [] for name in plans}}
    for _ in range(reps):  # round-robin, as above
        samples["vae_decode"].append(_timed_cpu(pipeline.decoder.decode_latents, plain, latents)[:2])
        for name, plan in plans.items():
            samples[name].append(_timed_cpu(pipeline.decoder.write_mp4, plan, frames, output)[:2])
    result = {"vae_decode": _median(samples["vae_decode"]), "encode": _median(samples["encode"])}
    base_wall, base_cpu = result["encode"]
    for name in CONTROLS:
        wall, cpu = _median(samples[name])
        result[name] = (max(0.0, wall - base_wall), max(0.0, cpu - base_cpu))
    try:
        from vidgen_serve.media.quality import quality_metrics
    except ImportError:
        result["quality metrics"] = None
    else:  # on the native frames, as the Decoder computes them (before frame-rate conversion and upscale)
        samples = [_timed_cpu(quality_metrics, frames)[:2] for _ in range(reps)]
        result["quality metrics"] = _median(samples)
    return result


def ratios(costs: dict, controls: dict) -> dict[str, float | None]:
    """The ratios the benchmark reports, CPU and wall seconds (None where a part is not available)."""
    durations = sorted(costs)
    short, long_ = costs[durations[0]], costs[durations[-1]]
    out: dict[str, float | None] = {
        f"per-second cost {durations[-1]:g}s / {durations[0]:g}s (cpu)": long_["cpu_per_s"] / short["cpu_per_s"],
        f"per-second cost {durations[-1]:g}s / {durations[0]:g}s (wall)": long_["wall_per_s"] / short["wall_per_s"],
    }
    for name in (*CONTROLS, "quality metrics"):
        value = controls[name]
        for kind, i in (("cpu", 1), ("wall", 0)):  # values are (wall, cpu)
            out[f"{name} / vae decode ({kind})"] = None if value is None else value[i] / controls["vae_decode"][i]
    return out


ARCHITECTURES_COUNTED = {"1.3B": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "14B": "Wan-AI/Wan2.1-T2V-14B-Diffusers"}


def architecture_costs(durations: list[float], resolution: str) -> dict[str, dict[float, float]]:
    """{"<model> <schedule>": {duration: denoise FLOPs per step per second of output}} (meta tensors)."""
    from vidgen_serve.config import AppConfig
    from vidgen_serve.models.architectures import ARCHITECTURES
    from vidgen_serve.models.flops import plan_step_flops
    from vidgen_serve.plan import build_plan
    from vidgen_serve.request import VideoRequest

    out = {}
    for model, checkpoint in ARCHITECTURES_COUNTED.items():
        arch = ARCHITECTURES[checkpoint]["transformer"]
        profile = "wan2.1-1.3b" if model == "1.3B" else "wan2.1-14b-tp8"  # the plan: same windows on any layout
        for schedule in ("overlap", "shifted"):
            config = AppConfig(profile=profile, profile_overrides={"window_schedule": schedule})
            out[f"{model} {schedule}"] = {
                d: plan_step_flops(arch, build_plan(VideoRequest(prompt=PROMPT, duration=d, resolution=resolution,
                                                                 seed=SEED), config)) / d
                for d in durations}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--reps", type=int, default=5, help="repetitions per measurement (median reported)")
    parser.add_argument("--quick", action="store_true", help="480p, 1/2/3 s, one run each (smoke check)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--window-schedule", choices=("overlap", "shifted"), default=None,
                        help="the profile's window_schedule for the timed part (default: the profile's)")
    args = parser.parse_args(argv)

    import torch

    from vidgen_serve.config import AppConfig
    from vidgen_serve.pipeline import VideoPipeline
    from vidgen_serve.plan import build_plan
    from vidgen_serve.request import VideoRequest

    durations, resolution, reps = ([1.0, 2.0, 3.0], "480p", 1) if args.quick else ([5.0, 10.0, 15.0], "720p",
                                                                                      args.reps)
    overrides = {"window_schedule": args.window_schedule} if args.window_schedule else {}
    config = AppConfig(profile=args.profile, profile_overrides=overrides)
    pipeline = VideoPipeline(config)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads); profile {config.profile}; {resolution}; "
          f"medians of {reps} run(s); load average at start {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory(prefix="vidgen-bench-") as workdir:
        warm = build_plan(VideoRequest(prompt=PROMPT, duration=1, resolution="480p", seed=SEED), config)
        pipeline.generate(warm, os.path.join(workdir, "warmup.mp4"))
        costs = per_second_cost(pipeline, config, durations, resolution, reps, workdir)
        controls = control_costs(pipeline, config, durations[0], resolution, reps, workdir)

    print(f"\n{'duration':>9}{'windows':>9}{'wall s':>9}{'CPU s':>9}{'wall s/s':>10}{'CPU s/s':>9}")
    for duration, row in costs.items():
        print(f"{duration:>8g}s{row['windows']:>9}{row['wall_s']:>9.2f}{row['cpu_s']:>9.2f}"
              f"{row['wall_per_s']:>10.3f}{row['cpu_per_s']:>9.3f}")
    print(f"\n{durations[0]:g} s case: {'stage / control':<18}{'wall s':>9}{'CPU s':>9}")
    for name in ("vae_decode", "encode", *CONTROLS, "quality metrics"):
        value = controls[name]
        cells = f"{'n/a':>9}{'n/a':>9}" if value is None else f"{value[0]:>9.3f}{value[1]:>9.3f}"
        extra = " (extra over the plain encode)" if name in CONTROLS else ""
        print(f"{'':>{len(f'{durations[0]:g} s case: ')}}{name:<18}{cells}{extra}")
    counted = {} if args.quick else architecture_costs(durations, resolution)
    if counted:
        print(f"\ndenoise FLOPs per step per second of {resolution} output (real architectures, counted):")
        print(f"{'':16}" + "".join(f"{d:>10g}s" for d in durations) + f"{'last/first':>12}")
        for name, row in counted.items():
            print(f"{name:16}" + "".join(f"{row[d] / 1e12:>10.1f}T" for d in durations)
                  + f"{row[durations[-1]] / row[durations[0]]:>12.3f}")
    print()
    reported = ratios(costs, controls)
    for name, row in counted.items():
        reported[f"denoise FLOPs per-second {durations[-1]:g}s / {durations[0]:g}s ({name})"] = \
            row[durations[-1]] / row[durations[0]]
    for name, value in reported.items():
        goal = f"  (goal <= {GOAL_LONG_OVER_SHORT})" if (name.startswith("per-second") and "cpu" in name) or \
            name.startswith("denoise FLOPs") else ""
        print(f"ratio {name}: {'n/a' if value is None else f'{value:.3f}'}{goal}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"costs": {str(k): v for k, v in costs.items()}, "controls": controls, "ratios": reported,
                       "denoise_flops_per_second": {k: {str(d): v for d, v in row.items()} for k, row in counted.items()},
                       "window_schedule": config.model_profile.window_schedule, "quick": args.quick}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
