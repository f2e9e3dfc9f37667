"""GPU check: the project's own stages on the real Wan 2.1 architectures, as one JSON document.

On a GPU machine (<= ~5 minutes on one H100) it measures, with random weights built directly on
the GPU in bf16 (`weights: random`, nothing downloaded):

  device            GPU, versions, datasheet peak and a measured bf16 matmul rate
  transformer       seconds per CFG step, TFLOP per step (counted from the architecture), MFU and
                    peak memory: Wan 2.1 1.3B and 14B at 480p and 720p (81 frames)
  text_encoder      UMT5-XXL encode time and peak memory
  vae_decode        81 frames at 480p: float32, bf16, bf16 tiled (time, peak memory, difference)
  post_processing   minterpolate mci single vs chunked, blend, the 1080p 8 s post-processing
  tiny_end_to_end   the tiny profile through VideoPipeline on the device
  profile_end_to_end  the first real profile (random weights, bf16) through VideoPipeline: text
                    encode, sliding-window denoise, VAE decode, post-processing and MP4, with every
                    creative control on; a short and a 3x longer video at few steps, and the ratio
                    of their cost per second of output (the sliding windows should scale linearly)
  speed_options     for every speed option: its speed-up over the plain path and its difference
                    from it (compile, attention backends, step caches, int8 / fp8 weights);
                    multi-GPU layouts are reported as skipped with the reason
  goals             the issue's targets, from the numbers above

`--cpu-smoke` runs every part at toy sizes on CPU (the tiny architecture in bf16), so the
script itself is tested on every commit (tests/test_gpu_check.py). Single-GPU parts need only
torch, diffusers, transformers, pydantic (the project's config) and an ffmpeg binary; no Ray or
DeepSpeed is imported. A part that fails is reported under "errors" and the others still run.

Run: ``python benchmarks/gpu_check.py [--cpu-smoke] [--out results.json] [--parts a,b]``. On a GPU,
commit the JSON as ``benchmarks/results/<gpu>-<date>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import math
import os
import sys
import time
import traceback

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_HERE)
for _path in (_REPO, _HERE):
    if _path not in sys.path:
        sys.path.insert(0, _path)

# In order of what a short GPU lease must not miss: the stages end to end first, timings after.
PARTS = ["device", "tiny_end_to_end", "profile_end_to_end", "transformer", "vae_decode", "text_encoder",
         "speed_options", "post_processing"]
# Dense bf16 TFLOP/s from the datasheets (MFU denominators); matched against the device name.
DATASHEET_BF16_TFLOPS = [("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("H800", 989.0),
                         ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10", 125.0)]
GIB = 2**30
SPEED_OPTIONS = ["compile", "attention_backend", "step_cache", "int8_weight_only", "float8_dynamic"]


class Check:
    """Sizes and helpers of one run: GPU mode (real architectures) or CPU smoke (toy sizes)."""

    def __init__(self, smoke: bool, full: bool = False):
        import torch

        self.torch = torch
        self.smoke = smoke
        self.device = torch.device("cpu") if smoke else torch.device("cuda", 0)
        if not smoke and not torch.cuda.is_available():
            raise SystemExit("no CUDA GPU visible: run with --cpu-smoke for the CPU check")
        # Models: profile name and overrides; sizes: native (width, height) per output resolution.
        if smoke:
            self.models = {"tiny": ("tiny", {})}
            self.sizes = {"480p": (112, 64), "720p": (160, 96)}
            self.steps = {"timed": 2, "cache": 6}
        else:
            self.models = {"wan2.1-1.3b": ("wan2.1-1.3b", {}),
                           "wan2.1-14b": ("wan2.1-14b-tp8", {"tensor_parallel_size": 1})}
            self.sizes = {"480p": (832, 480), "720p": (1280, 720)}
            self.steps = {"timed": 2, "cache": 10}
        # Resolutions per model in the transformer part; by default the 14B only at 480p (its 720p
        # step alone is ~25 s on an H100, GPU.md), `--full` measures every pair.
        self.model_sizes = {} if (smoke or full) else {"wan2.1-14b": ["480p"]}
        self.peak_tflops: float | None = None
        self.options = set(SPEED_OPTIONS)
        self.window_schedules = ["overlap"]  # profile_end_to_end's window schedules (--window-schedules)

    # -- device helpers --------------------------------------------------------------------
    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float | None:
        if self.device.type != "cuda":
            return None  # CPU: no allocator statistics
        return self.torch.cuda.max_memory_allocated(self.device) / GIB

    def timed(self, fn, *args, **kwargs):
        self.sync()
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        self.sync()
        return out, time.perf_counter() - t0

    # -- configs -------------------------------------------------------------------------------
    def config(self, model: str, resolution: str = "480p", **overrides):
        """The model's profile with random weights, on this device, rendering `resolution` natively."""
        from vidgen_serve.config import PROFILES, AppConfig

        profile_name, base = self.models[model]
        width, height = self.sizes[resolution]
        sizes = dict(PROFILES[profile_name].native_sizes)
        sizes.update({"16:9": (width, height), "9:16": (height, width)})
        return AppConfig(profile=profile_name, profile_overrides={
            "weights": "random", "device": self.device.type, "dtype": "bfloat16", "native_sizes": sizes,
            **base, **overrides})

    def plan(self, config, steps: int, seed: int = 0, **request):
        """By default one full window (81 frames for Wan 2.1) at the profile's 16:9 native size, with CFG."""
        from vidgen_serve.plan import build_plan
        from vidgen_serve.request import VideoRequest

        profile = config.model_profile
        fields = {"prompt": "gpu check", "duration": (profile.max_window_frames - 1) / profile.native_fps,
                  "resolution": "480p", "seed": seed, "num_inference_steps": steps, "guidance_scale": 5.0, **request}
        return build_plan(VideoRequest(**fields), config)

    def embeddings(self, config, text_dim: int):
        """Synthetic prompt embeddings of the encoder's shape (the denoiser's cost does not depend on them)."""
        from vidgen_serve.pipeline import PromptEmbeddings

        generator = self.torch.Generator().manual_seed(0)
        shape = (1, config.model_profile.max_sequence_length, text_dim)
        make = lambda: self.torch.randn(shape, generator=generator).to(self.torch.bfloat16)  # noqa: E731
        return PromptEmbeddings(make(), make())

    def denoise(self, denoiser, plan, embeddings, warm_steps: int = 1):
        """(latents, seconds per step after `warm_steps` untimed steps)."""
        run = denoiser.start(plan, embeddings)
        while run.step < warm_steps:
            run.advance()
        self.sync()
        t0 = time.perf_counter()
        while not run.done:
            run.advance()
        self.sync()
        steps = plan.num_inference_steps - warm_steps
        return run.latents(), (time.perf_counter() - t0) / steps


@contextlib.contextmanager
def _warm_up_log():
    """The Denoiser's warm-up log lines (one per compiled shape, then the total), as a list filled while
    inside; also printed to stderr as they come, so a run stopped mid-compile shows the shape it was on."""
    import logging

    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())
            print(f"gpu_check: {record.getMessage()}", file=sys.stderr, flush=True)

    logger = logging.getLogger("vidgen_serve.pipeline.denoiser")
    handler, level = Collect(logging.INFO), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _diff(a, b) -> dict:
    a, b = a.float(), b.float()
    return {"max_abs_diff": float((a - b).abs().max()), "rel_diff": float((a - b).norm() / b.norm())}


def _cpu_seconds() -> float:
    """User + system CPU of this process and its finished children (ffmpeg): wall time on a busy machine
    includes waiting for a core, this does not."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _finite(node):
    """The report with NaN / infinite numbers as null (JSON has neither), recursively."""
    if isinstance(node, dict):
        return {k: _finite(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_finite(v) for v in node]
    if isinstance(node, float) and not math.isfinite(node):
        return None
    return node


def _tensor_bytes(tensor) -> int:
    """Bytes a tensor holds; a quantised tensor subclass (torchao) counts its inner tensors, not its dtype."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def _model_bytes(model) -> int:
    return sum(_tensor_bytes(t) for t in [*model.parameters(), *model.buffers()])


def part_device(check: Check) -> dict:
    import diffusers
    import torch
    import transformers

    from vidgen_serve.media.mp4 import available_cpus

    info = {"type": check.device.type, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "cpus": available_cpus()}
    try:
        import torchao

        info["torchao"] = torchao.__version__
    except ImportError:
        info["torchao"] = None
    n = 2048 if check.smoke else 8192
    a = torch.randn(n, n, device=check.device, dtype=torch.bfloat16)
    check.timed(torch.matmul, a, a)  # warm-up
    reps = 2 if check.smoke else 20
    _, seconds = check.timed(lambda: [torch.matmul(a, a) for _ in range(reps)])
    info["matmul_bf16_tflops"] = 2 * n**3 * reps / seconds / 1e12
    if check.device.type == "cuda":
        name = torch.cuda.get_device_name(check.device)
        info.update(name=name, count=torch.cuda.device_count(),
                    capability=".".join(map(str, torch.cuda.get_device_capability(check.device))),
                    memory_gib=torch.cuda.get_device_properties(check.device).total_memory / GIB)
        peak = next((tflops for key, tflops in DATASHEET_BF16_TFLOPS if key in name), None)
    else:
        info.update(name="cpu", count=0)
        peak = None
    check.peak_tflops = peak or info["matmul_bf16_tflops"]
    info["peak_tflops"] = check.peak_tflops
    info["peak_source"] = "datasheet dense bf16" if peak else "measured bf16 matmul"
    return info


def part_transformer(check: Check, keep: dict) -> dict:
    """Seconds per CFG step, TFLOP, MFU and peak memory per model and resolution."""
    from vidgen_serve.models.flops import plan_step_flops, transformer_flops
    from vidgen_serve.pipeline import Denoiser

    results: dict = {}
    for model in check.models:
        results[model] = {}
        for resolution in check.model_sizes.get(model, check.sizes):
            config = check.config(model, resolution)
            check.reset_peak()
            denoiser, build_s = check.timed(Denoiser, config)
            plan = check.plan(config, steps=1 + check.steps["timed"])
            emb = check.embeddings(config, denoiser.transformer.config.text_dim)
            latents, s_per_step = check.denoise(denoiser, plan, emb)
            flops = plan_step_flops(denoiser.transformer.config, plan)
            win = plan.windows[0]
            share = transformer_flops(denoiser.transformer.config, win.length, plan.latent_height,
                                      plan.latent_width)
            results[model][resolution] = {
                "native": f"{plan.native_width}x{plan.native_height}x{plan.num_frames}",
                "tokens": plan.window_tokens,
                "s_per_step": s_per_step,
                "tflop_per_step": flops / 1e12,
                "attention_share": share["attention"] / share["total"],
                "mfu": flops / s_per_step / (check.peak_tflops * 1e12),
                "peak_mem_gib": check.peak_gib(),
                "weights_gib": _model_bytes(denoiser.transformer) / GIB,
                "build_s": build_s,
            }
            if resolution == "480p" and model == next(iter(check.models)):
                keep["baseline"] = (config, denoiser, plan, emb, latents, s_per_step)  # for speed_options
            else:
                del denoiser
    return results


def part_speed_options(check: Check, keep: dict) -> dict:
    """Each option against the plain path of the first model at 480p: speed-up and difference."""
    import torch

    from vidgen_serve.models.loading import runtime_problems
    from vidgen_serve.pipeline import Denoiser

    if "baseline" not in keep:
        part_transformer_baseline(check, keep)
    config, plain, plan, emb, plain_latents, plain_s = keep["baseline"]
    model = next(iter(check.models))
    results: dict = {}

    def option(exact: bool, **overrides):
        """(result, denoiser) of the plain plan with `overrides`; (skipped reason, None) where it can't run."""
        cfg = check.config(model, "480p", **overrides)
        problems = runtime_problems(cfg.model_profile, check.device)
        if problems:
            return {"skipped": "; ".join(problems)}, None
        check.reset_peak()
        denoiser, build_s = check.timed(Denoiser, cfg)
        latents, s_per_step = check.denoise(denoiser, plan, emb)
        weights = _model_bytes(denoiser.transformer)
        return {"exact": exact, "s_per_step": s_per_step, "speedup": plain_s / s_per_step, "build_s": build_s,
                "weights_gib": weights / GIB, "memory_saved_gib": (_model_bytes(plain.transformer) - weights) / GIB,
                "peak_mem_gib": check.peak_gib(), **_diff(latents, plain_latents)}, denoiser

    # Regional compilation, warmed up in the constructor: requests of other sizes, aspects and
    # without CFG must compile nothing.
    from torch._dynamo.utils import counters

    backend = "aot_eager" if check.smoke else "inductor"
    with _warm_up_log() as warm_up_log:  # the Denoiser logs each warm-up shape's seconds
        results["compile"], denoiser = (option(True, compile=True, compile_backend=backend)
                                        if "compile" in check.options else ({"skipped": "not in --options"}, None))
    if denoiser is not None:
        graphs = counters["stats"]["unique_graphs"]
        requests = {"1s_16:9_cfg": {"duration": 1}, "1s_1:1_cfg": {"duration": 1, "aspect": "1:1"},
                    "1s_16:9_no_cfg": {"duration": 1, "guidance_scale": 1.0}}
        per_request = {}
        for name, request in requests.items():
            before = counters["stats"]["unique_graphs"]
            _, seconds = check.timed(denoiser.denoise, check.plan(config, steps=1, **request), emb)
            per_request[name] = {"seconds": seconds, "compiles": counters["stats"]["unique_graphs"] - before}
        results["compile"].update(warm_up_s=denoiser.warm_up_seconds, backend=backend, warm_up_log=warm_up_log,
                                  plain_s_per_step=plain_s, requests=per_request,
                                  compiles_during_requests=counters["stats"]["unique_graphs"] - graphs)
        del denoiser

    backends = [] if "attention_backend" not in check.options else ["_native_math"] if check.smoke else ["_native_cudnn", "_native_flash", "_native_efficient"]
    results["attention_backend"] = {name: option(True, attention_backend=name)[0] for name in backends}

    # Step caching over a whole run (the plain run at the same step count is the reference).
    results["step_cache"] = {}
    if "step_cache" in check.options:
        cache_plan = check.plan(config, steps=check.steps["cache"])
        reference, reference_s = check.timed(plain.denoise, cache_plan, emb)
    for mode in ("off", "first_block", "taylorseer") if "step_cache" in check.options else ():
        latents, seconds = check.timed(plain.denoise, cache_plan.model_copy(update={"step_cache": mode}), emb)
        results["step_cache"][mode] = {"exact": mode == "off", "steps": cache_plan.num_inference_steps,
                                       "seconds": seconds, "speedup": reference_s / seconds,
                                       **_diff(latents, reference)}

    for quant in [q for q in ("int8_weight_only", "float8_dynamic") if q in check.options]:
        results[quant], denoiser = option(False, quantization=quant)
        del denoiser

    count = torch.cuda.device_count() if check.device.type == "cuda" else 0
    for layout in ("cfg_parallel", "ulysses"):
        reason = (f"needs >= 2 GPUs; {count} visible" if count < 2 else
                  "multi-GPU layouts run in the Ray/DeepSpeed worker group (vidgen_serve.parallel), not in "
                  "this single-GPU check")
        results[layout] = {"skipped": reason}
    return results


def part_transformer_baseline(check: Check, keep: dict) -> None:
    """The plain denoiser of the first model at 480p (when --parts skips the transformer part)."""
    from vidgen_serve.pipeline import Denoiser

    model = next(iter(check.models))
    config = check.config(model, "480p")
    denoiser = Denoiser(config)
    plan = check.plan(config, steps=1 + check.steps["timed"])
    emb = check.embeddings(config, denoiser.transformer.config.text_dim)
    latents, s_per_step = check.denoise(denoiser, plan, emb)
    keep["baseline"] = (config, denoiser, plan, emb, latents, s_per_step)


def part_text_encoder(check: Check, keep: dict) -> dict:
    from vidgen_serve.pipeline import TextEncoder

    model = next(iter(check.models))
    results = {}
    reference = None
    for quant in ("none", "int8_weight_only"):
        config = check.config(model, "480p", text_encoder_quantization=quant, text_cache_size=0)
        check.reset_peak()
        encoder, build_s = check.timed(TextEncoder, config)
        plan = check.plan(config, steps=1)
        encoder.encode(plan)  # warm-up
        emb, seconds = check.timed(encoder.encode, plan)
        out = {"seconds": seconds, "build_s": build_s, "peak_mem_gib": check.peak_gib(),
               "weights_gib": _model_bytes(encoder._pipe.text_encoder) / GIB}
        if reference is None:
            reference = emb.prompt_embeds
        else:
            out.update(_diff(emb.prompt_embeds, reference))
        results["bfloat16" if quant == "none" else quant] = out
        del encoder
    return results


def part_vae_decode(check: Check, keep: dict) -> dict:
    import numpy as np
    import torch

    from vidgen_serve.pipeline import Decoder

    model = next(iter(check.models))
    variants = {"float32": {"vae_dtype": "float32"}, "bfloat16": {"vae_dtype": "bfloat16"},
                "bfloat16_tiled": {"vae_dtype": "bfloat16", "vae_tiling": True,
                                   **({"vae_tile_px": 32} if check.smoke else {})}}
    results: dict = {}
    reference = None
    for name, overrides in variants.items():
        config = check.config(model, "480p", **overrides)
        plan = check.plan(config, steps=1, **({"duration": 1} if check.smoke else {}))  # 81 frames on GPU
        latents = torch.randn((1, 16, plan.latent_frames, plan.latent_height, plan.latent_width),
                              generator=torch.Generator().manual_seed(0))
        decoder = Decoder(config)
        check.reset_peak()
        frames, seconds = check.timed(decoder.decode_latents, plan, latents)
        out = {"seconds": seconds, "peak_mem_gib": check.peak_gib(), "frames": int(len(frames)),
               "exact": False}
        if reference is None:
            reference = frames.astype(np.int16)
        else:
            out["mean_abs_diff_u8"] = float(np.abs(frames.astype(np.int16) - reference).mean())
            out["speedup"] = results["float32"]["seconds"] / seconds
        results[name] = out
        keep.setdefault("decoded", frames)
        del decoder
    return results


def part_post_processing(check: Check, keep: dict) -> dict:
    from postprocess import measure

    if check.smoke:
        return measure(width=208, height=120, frames_in=41, encode_1080p=False)
    return measure(one_thread_baseline=False)  # x264 1080p on one thread alone would take a minute


def part_tiny_end_to_end(check: Check, keep: dict) -> dict:
    import tempfile

    from vidgen_serve.config import AppConfig
    from vidgen_serve.pipeline import VideoPipeline
    from vidgen_serve.plan import build_plan
    from vidgen_serve.request import VideoRequest

    config = AppConfig(profile="tiny", profile_overrides={"device": check.device.type, "dtype": "bfloat16",
                                                         "vae_dtype": "bfloat16"})
    pipeline = VideoPipeline(config)
    plan = build_plan(VideoRequest(prompt="一只橘猫在樱花树下追逐蝴蝶", duration=1, resolution="480p", seed=0,
                                   num_inference_steps=2), config)
    with tempfile.TemporaryDirectory() as tmp:
        result, seconds = check.timed(pipeline.generate, plan, os.path.join(tmp, "tiny.mp4"))
        size = os.path.getsize(result.path)
    return {"device": check.device.type, "seconds": seconds, "timings": result.timings, "mp4_bytes": size,
            "output_frames": plan.output_num_frames}


def part_profile_end_to_end(check: Check, keep: dict) -> dict:
    """The first model's profile through VideoPipeline with every control on; long ÷ short cost per second.

    Per window schedule of `check.window_schedules` (the profile field `window_schedule`; the plans
    differ, the pipeline is the same): the short and the long video, and their ratios. The first
    schedule's rows are also the top-level `short`, `long` and `long_over_short_per_second`.
    """
    import subprocess
    import tempfile

    import numpy as np

    from vidgen_serve.media.mp4 import ffmpeg_exe
    from vidgen_serve.pipeline import VideoPipeline

    model = next(iter(check.models))
    config = check.config(model, "480p")
    check.reset_peak()
    pipeline, build_s = check.timed(VideoPipeline, config)
    controls = {"motion_intensity": 1.0, "color_palette": "warm", "camera_motion": "pan",
                "temporal_consistency": 0.9, "negative_prompt": "blurry"}
    short, long_ = (2, 6) if check.smoke else (5, 15)  # smoke: the long video spans two tiny windows
    results: dict = {"model": model, "build_s": build_s, "steps": 2, "controls": controls}

    # The denoiser's final latents of each request, for the sanity figures (finite, spread)
    denoise, last = pipeline.denoiser.denoise, {}

    def keep_latents(*args, **kwargs):
        last["latents"] = denoise(*args, **kwargs)
        return last["latents"]

    pipeline.denoiser.denoise = keep_latents
    with tempfile.TemporaryDirectory() as tmp:
        def request(cfg, duration: float):
            return check.plan(cfg, steps=2, duration=duration, prompt="主体:熊猫;动作:吃竹子;场景:竹林", **controls)

        def run(plan, name: str) -> dict:
            duration = plan.duration_s
            out = os.path.join(tmp, f"{name}.mp4")
            result, seconds = check.timed(pipeline.generate, plan, out)
            # The MP4 read back with the same ffmpeg binary (PyAV is a test extra, absent on GPU images).
            raw = subprocess.run([ffmpeg_exe(), "-v", "error", "-i", out, "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
                                 capture_output=True, check=True).stdout
            w, h = plan.output_width, plan.output_height
            pixels = np.frombuffer(raw, dtype=np.uint8).reshape(-1, h, w, 3).astype(np.float32)
            latents = last.pop("latents").float()
            frame_std = pixels.reshape(len(pixels), -1).std(axis=1)
            return {"duration_s": duration, "seconds": seconds, "s_per_output_s": seconds / duration,
                    "denoise_s_per_output_s": result.timings["denoise"] / duration,
                    "window_schedule": plan.window_schedule, "windows": len(plan.windows),
                    "window_lengths": [[win.length for win in tiling] for tiling in plan.tilings],
                    "output_frames": len(pixels), "expected_frames": plan.output_num_frames, "size": f"{w}x{h}",
                    "pixel_mean": float(pixels.mean()), "pixel_std": float(pixels.std()),
                    "min_frame_std": float(frame_std.min()),
                    "mean_abs_frame_step": float(np.abs(np.diff(pixels, axis=0)).mean()) if len(pixels) > 1 else 0.0,
                    "latents_finite": bool(latents.isfinite().all()), "latents_std": float(latents.std()),
                    "mp4_bytes": os.path.getsize(out), "timings": result.timings, "quality": result.quality}

        run(request(config, 1), "warm")  # first call: kernels, caches
        results["schedules"] = {}
        plans: dict = {}
        for schedule in check.window_schedules:
            cfg = check.config(model, "480p", window_schedule=schedule)
            rows: dict = {}
            for case, duration in (("short", short), ("long", long_)):
                plan = request(cfg, duration)
                same = next((other for other in results["schedules"] if plans[other][case].tilings == plan.tilings),
                            None)
                if same is not None:  # the same windows as a schedule already run: the same computation
                    rows[case] = {**results["schedules"][same][case], "same_plan_as": same}
                else:
                    rows[case] = run(plan, f"{schedule}-{case}")
                plans.setdefault(schedule, {})[case] = plan
            rows["long_over_short_per_second"] = rows["long"]["s_per_output_s"] / rows["short"]["s_per_output_s"]
            rows["denoise_long_over_short_per_second"] = (rows["long"]["denoise_s_per_output_s"]
                                                          / rows["short"]["denoise_s_per_output_s"])
            results["schedules"][schedule] = rows
    pipeline.denoiser.denoise = denoise
    first = results["schedules"][check.window_schedules[0]]
    results.update(short=first["short"], long=first["long"],
                   long_over_short_per_second=first["long_over_short_per_second"])
    results["peak_mem_gib"] = check.peak_gib()
    results["goal_long_over_short"] = 1.15
    del pipeline
    return results


def goals(report: dict) -> dict:
    """The issue's targets, computed from the measured parts (None where a part is missing)."""
    def get(*keys):
        node = report
        for key in keys:
            if not isinstance(node, dict) or key not in node:
                return None
            node = node[key]
        return node

    first = next(iter(report.get("transformer") or {"": {}}))
    step = get("transformer", first, "480p", "s_per_step")
    text = get("text_encoder", "bfloat16", "seconds")
    vae = get("vae_decode", "bfloat16", "seconds")
    post = get("post_processing", "1080p_8s_s") or get("post_processing", "mci_chunked_s")
    out = {"model": first}
    if step is not None:
        denoise_50 = 50 * step
        out["denoise_50_steps_s"] = denoise_50
        if None not in (text, vae, post):
            out["end_to_end_50_steps_estimate_s"] = text + denoise_50 + vae + post
            out["post_processing_over_denoise"] = post / denoise_50
    out["mfu_480p"] = get("transformer", first, "480p", "mfu")
    out["wan2.1-14b_480p_s_per_step"] = get("transformer", "wan2.1-14b", "480p", "s_per_step")
    out["targets"] = {"end_to_end_50_steps_estimate_s": 45.0, "wan2.1-14b_480p_s_per_step": 5.0, "mfu_480p": 0.55,
                      "post_processing_over_denoise": 0.25}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="GPU check of the project's stages on the real Wan 2.1 sizes.")
    parser.add_argument("--cpu-smoke", action="store_true", help="every part at toy sizes on CPU")
    parser.add_argument("--parts", help=f"comma-separated subset of: {', '.join(PARTS)}")
    parser.add_argument("--out", help="also write the JSON document to this file")
    parser.add_argument("--options", help=f"speed options to measure, a subset of: {', '.join(SPEED_OPTIONS)}")
    parser.add_argument("--full", action="store_true", help="every model at every resolution (the 14B at 720p too)")
    parser.add_argument("--window-schedules", default="overlap",
                        help="profile_end_to_end: window schedules to run, a subset of: overlap, shifted (the "
                             "first one's rows are also the part's top-level rows)")
    args = parser.parse_args(argv)
    parts = PARTS if not args.parts else [p.strip() for p in args.parts.split(",")]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown {unknown}; valid: {PARTS}")
    if "device" not in parts:
        parts = ["device", *parts]  # MFU needs the peak

    import logging

    logging.getLogger("torchao").setLevel(logging.ERROR)
    started = time.perf_counter()
    check = Check(smoke=args.cpu_smoke, full=args.full)
    if args.options:
        check.options = {o.strip() for o in args.options.split(",")}
    check.window_schedules = [w.strip() for w in args.window_schedules.split(",") if w.strip()]
    if not check.window_schedules or set(check.window_schedules) - {"overlap", "shifted"}:
        parser.error(f"--window-schedules: {args.window_schedules!r}; valid: overlap, shifted")
    report: dict = {"schema_version": 1, "mode": "cpu-smoke" if args.cpu_smoke else "gpu",
                    "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "errors": {}}
    keep: dict = {}
    for part in PARTS:
        if part not in parts:
            continue
        t0, c0 = time.perf_counter(), _cpu_seconds()
        try:
            fn = globals()[f"part_{part}"]
            with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON document alone
                report[part] = fn(check) if part == "device" else fn(check, keep)
        except Exception as exc:  # one broken part must not hide the others' numbers
            report["errors"][part] = f"{type(exc).__name__}: {exc}"
            print(traceback.format_exc(), file=sys.stderr)
        print(f"gpu_check: {part} done in {time.perf_counter() - t0:.1f}s ({_cpu_seconds() - c0:.1f} CPU s)",
              file=sys.stderr)
        check.reset_peak()
        if args.out:  # what is measured so far survives a run stopped at a lease's time limit
            with open(args.out, "w") as f:
                json.dump(_finite({**report, "partial": True}), f, indent=2, allow_nan=False, default=str)
    keep.clear()
    report["goals"] = goals(report)
    report["seconds"] = time.perf_counter() - started
    report["imported"] = {name: sys.modules.get(name) is not None for name in ("ray", "deepspeed")}
    text = json.dumps(_finite(report), indent=2, allow_nan=False, default=str)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
