"""Step time of each parallel layout of the Wan transformer, and its difference from one rank.

For a multi-GPU machine (NCCL; torch, diffusers, DeepSpeed, pydantic; no Ray): builds the real
Wan 2.1 architecture with random weights (the same seed on every rank) in bfloat16, runs one
denoising step's transformer call (the CFG batch of 2: conditional + unconditional) on one
rank, then on every layout given (``tp=8``, ``ulysses=8``, ``ulysses=4,cfg=2`` ...) through the
project's own plans (`vidgen_serve.parallel.transformer.parallelize_transformer`), and prints
one JSON document: seconds per step (min of ``--repeats`` after ``--warmup``), speed-up and
parallel efficiency against one rank, and the largest difference of the output.

    python benchmarks/parallel_check.py                       # 14B, 720p, all 8-GPU layouts
    python benchmarks/parallel_check.py --model 1.3b --resolution 480p --layouts cfg=2 ulysses=2
    python benchmarks/parallel_check.py --cpu-smoke           # tiny model, gloo, CPU ranks

Each layout size runs in its own spawned group of ranks (``torch.multiprocessing``), one GPU per
rank; the one-rank reference runs first, alone.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import time
from typing import Any

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

# Wan 2.1 transformer configs (diffusers' WanTransformer3DModel arguments).
_WAN_COMMON = dict(patch_size=(1, 2, 2), in_channels=16, out_channels=16, text_dim=4096, freq_dim=256,
                   cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6)
MODELS: dict[str, dict[str, Any]] = {
    "14b": dict(_WAN_COMMON, num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40),
    "1.3b": dict(_WAN_COMMON, num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30),
    # The project's tiny profile (vidgen_serve.models.tiny.TRANSFORMER_CONFIG).
    "tiny": dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=12, in_channels=16,
                 out_channels=16, text_dim=32, freq_dim=256, ffn_dim=64, num_layers=2, cross_attn_norm=True,
                 qk_norm="rms_norm_across_heads", rope_max_seq_len=64),
}
#: Native (width, height) and text length per resolution; 81 frames -> 21 latent frames.
RESOLUTIONS = {"720p": (1280, 720), "480p": (832, 480)}
TEXT_LEN = 512
DEFAULT_LAYOUTS = ["tp=8", "ulysses=8", "ulysses=4,cfg=2", "tp=4,cfg=2", "ulysses=2,tp=4"]
SMOKE_LAYOUTS = ["tp=2", "cfg=2", "ulysses=2", "ulysses=4", "tp=2,cfg=2", "ulysses=2,cfg=2", "tp=2,ulysses=2"]


def parse_layout(text: str) -> dict[str, int]:
    """``"ulysses=4,cfg=2"`` -> ``{"ulysses": 4, "cfg": 2}`` (the CLI's ``--parallel`` syntax)."""
    from vidgen_serve.cli import parse_parallel

    return parse_parallel(text) or {}


def layout_size(layout: dict[str, int]) -> int:
    return layout.get("tp", 1) * layout.get("ulysses", 1) * layout.get("cfg", 1)


def build_transformer(config: dict, device, dtype):
    """``WanTransformer3DModel(**config)`` with seed-0 random weights, built on ``device`` in ``dtype``.

    Every rank builds the same weights (same seed, same device type); diffusers'
    ``_keep_in_fp32_modules`` are returned to float32 as ``from_pretrained`` keeps them.
    """
    import torch
    from diffusers import WanTransformer3DModel

    from vidgen_serve.parallel.tensor_parallel import cast_keep_fp32

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # no float32 copy of a 14B model
    try:
        with torch.device(device):
            model = WanTransformer3DModel(**config)
    finally:
        torch.set_default_dtype(previous)
    return cast_keep_fp32(model, dtype).eval().requires_grad_(False)


def make_inputs(spec: dict, device, dtype) -> dict:
    """One denoising step's transformer inputs: the CFG batch (2) of latents, timestep, text."""
    import torch

    g = torch.Generator("cpu").manual_seed(1)
    hidden = torch.randn(2, 16, *spec["latent"], generator=g)
    text = torch.randn(2, spec["text_len"], spec["config"]["text_dim"], generator=g)
    return dict(hidden_states=hidden.to(device, dtype), encoder_hidden_states=text.to(device, dtype),
                timestep=torch.tensor([750, 750], device=device), return_dict=False)


def _time_layouts(rank: int, world: int, port: int, spec: dict, layouts: list[dict], results) -> None:
    """A rank of a spawned group: every layout of this size in turn; rank 0 reports each."""
    import torch
    import torch.distributed as dist

    from vidgen_serve.config import ParallelLayout
    from vidgen_serve.parallel.process_group import ParallelGroups, build_parallel_groups, init_process_group
    from vidgen_serve.parallel.transformer import parallelize_transformer

    backend = "gloo" if spec["cpu"] else "nccl"
    if spec["cpu"]:
        # One core per rank, as one GPU per rank: the reference gets one, a layout N (and
        # several threads per rank on an oversubscribed CPU make the times erratic).
        torch.set_num_threads(1)
    if world > 1 or not spec["cpu"]:
        init_process_group(rank, world, "127.0.0.1", port, backend=backend, local_rank=rank)
    device = torch.device("cpu") if spec["cpu"] else torch.device("cuda", rank)
    dtype = getattr(torch, spec["dtype"])

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if world > 1:
            dist.barrier()

    for layout in layouts:
        groups = build_parallel_groups(ParallelLayout(**layout)) if world > 1 else ParallelGroups.single()
        model = parallelize_transformer(build_transformer(spec["config"], device, dtype), groups, dtype)
        inputs = make_inputs(spec, device, dtype)
        times = []
        with torch.inference_mode():
            for i in range(spec["warmup"] + spec["repeats"]):
                sync()
                t0 = time.perf_counter()
                out = model(**inputs)[0]
                sync()
                if i >= spec["warmup"]:
                    times.append(time.perf_counter() - t0)
        if rank == 0:
            results.put({"layout": layout, "ranks": world, "step_s": min(times),
                         # numpy: pickled by value (a tensor would be shared by a file descriptor
                         # that vanishes when this rank exits before the parent reads it)
                         "output": out.float().cpu().numpy(),
                         "peak_gib": (torch.cuda.max_memory_allocated(device) / 2**30
                                      if device.type == "cuda" else None)})
        del model, out
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
    if dist.is_initialized():
        dist.destroy_process_group()


def run_layouts(spec: dict, layouts: list[dict]) -> list[dict]:
    """Time one rank and every layout (grouped by size, one spawned group per size)."""
    import torch.multiprocessing as mp

    from vidgen_serve.net import find_free_port

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    by_size: dict[int, list[dict]] = {1: [{}]}
    for layout in layouts:
        by_size.setdefault(layout_size(layout), []).append(layout)
    out = []
    for size, group in by_size.items():
        ranks = mp.start_processes(_time_layouts, args=(size, find_free_port(), spec, group, results),
                                   nprocs=size, join=False, start_method="spawn")
        got: list[dict] = []
        # Read while the ranks run: a rank cannot exit before its queued result is read, and
        # join() raises (with the rank's traceback) as soon as one fails.
        while len(got) < len(group):
            try:
                got.append(results.get(timeout=1.0))
            except queue.Empty:
                if ranks.join(timeout=0):
                    raise RuntimeError(f"the {size}-rank group exited after {len(got)} of {len(group)} layouts")
        while not ranks.join():
            pass
        out.extend(got)
    return out


def report(spec: dict, measured: list[dict]) -> dict:
    """The JSON document: per layout its step time, speed-up, efficiency and output difference."""
    ref = measured[0]
    scale = float(abs(ref["output"]).max())
    rows = []
    for m in measured:
        diff = float(abs(m["output"] - ref["output"]).max())
        speedup = ref["step_s"] / m["step_s"]
        name = ",".join(f"{k}={v}" for k, v in m["layout"].items()) or "one rank"
        rows.append({"layout": name, "ranks": m["ranks"], "step_s": round(m["step_s"], 4),
                     "speedup": round(speedup, 3), "efficiency": round(speedup / m["ranks"], 3),
                     "max_abs_diff": diff, "max_rel_diff": diff / scale if scale else None,
                     "peak_gib": None if m["peak_gib"] is None else round(m["peak_gib"], 2)})
    return {
        "model": spec["model"], "dtype": spec["dtype"], "latent": list(spec["latent"]),
        "tokens": spec["tokens"], "device": spec["device_name"], "backend": "gloo" if spec["cpu"] else "nccl",
        "warmup": spec["warmup"], "repeats": spec["repeats"], "layouts": rows,
        **({"note": "CPU smoke: checks the layouts agree; CPU ranks share cores, so the times are not speed"}
           if spec["cpu"] else {}),
    }


def make_spec(args: argparse.Namespace) -> dict:
    import torch

    if args.cpu_smoke:
        model, latent, text_len, dtype = "tiny", (3, 10, 10), 16, args.dtype or "float32"
    else:
        model, dtype = args.model, args.dtype or "bfloat16"
        width, height = RESOLUTIONS[args.resolution]
        latent, text_len = ((args.frames - 1) // 4 + 1, height // 8, width // 8), TEXT_LEN
    config = MODELS[model]
    tokens = latent[0] * (latent[1] // 2) * (latent[2] // 2)
    cpu = args.cpu_smoke
    return {"model": model, "config": config, "latent": latent, "text_len": text_len, "dtype": dtype,
            "tokens": tokens, "cpu": cpu, "warmup": args.warmup, "repeats": args.repeats,
            "device_name": "cpu" if cpu else torch.cuda.get_device_name(0)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["14b", "1.3b"], default="14b")
    ap.add_argument("--resolution", choices=sorted(RESOLUTIONS), default="720p")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="default bfloat16 (float32 on --cpu-smoke)")
    ap.add_argument("--layouts", nargs="+", help=f"layouts to time (default: {' '.join(DEFAULT_LAYOUTS)})")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cpu-smoke", action="store_true",
                    help=f"tiny model on CPU ranks over gloo (layouts: {' '.join(SMOKE_LAYOUTS)})")
    ap.add_argument("--json", help="also write the JSON document here")
    args = ap.parse_args(argv)

    import torch

    layouts = [parse_layout(t) for t in (args.layouts or (SMOKE_LAYOUTS if args.cpu_smoke else DEFAULT_LAYOUTS))]
    if not args.cpu_smoke:
        gpus = torch.cuda.device_count()
        too_big = [layout for layout in layouts if layout_size(layout) > gpus]
        if too_big:
            ap.error(f"layouts {too_big} need more than the {gpus} visible GPUs (use --cpu-smoke without GPUs)")
    heads = MODELS["tiny" if args.cpu_smoke else args.model]["num_attention_heads"]
    for layout in layouts:
        if heads % (layout.get("tp", 1) * layout.get("ulysses", 1)):
            ap.error(f"layout {layout}: tp*ulysses must divide the model's {heads} heads")
    spec = make_spec(args)
    doc = report(spec, run_layouts(spec, layouts))
    text = json.dumps(doc, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
