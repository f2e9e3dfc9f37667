"""Paper numbers for the parallel denoiser: TP, Ulysses and CFG layouts of Wan 2.1 14B on 8 GPUs.

1. An analytic model of Wan 2.1 14B at 720p (1280x720, 81 frames = 75,600 tokens) on 8x A100
   (NVLink/NVSwitch): FLOPs per denoising step, what each layout computes and communicates per
   rank, and the predicted step time and parallel efficiency of TP=8, Ulysses=8,
   Ulysses=4 x CFG=2 (and two mixed layouts), with every assumption printed.  The one-GPU
   speed comes from the H100 measurement in GPU.md (MFU 52% for this model and size),
   applied to the A100's peak.
2. A measurement on this machine: the tiny transformer at one rank vs TP=2 (gloo), through
   ``benchmarks/parallel_check.py`` (which times any layout, on GPUs too).
3. With ``--group``: whole denoising steps through the serving path, the in-process
   ``Denoiser`` vs ``ParallelDenoiser`` (TP=2 Ray worker actors).

Run: ``python benchmarks/tp_paper.py`` (``--skip-measure`` for the analytic part only).
"""

from __future__ import annotations

import argparse
import os
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

# --------------------------------------------------------------------------------------------
# Wan 2.1 14B (T2V) dimensions and the 720p workload
# --------------------------------------------------------------------------------------------
WAN14B = dict(dim=5120, heads=40, head_dim=128, ffn=13824, layers=40, text_len=512, text_dim=4096,
              in_channels=16, out_channels=16, freq_dim=256, patch=(1, 2, 2))
WIDTH, HEIGHT, FRAMES = 1280, 720, 81
VAE_SPATIAL, VAE_TEMPORAL = 8, 4

# Hardware / efficiency assumptions for the prediction.
A100_BF16_PEAK = 312e12        # FLOP/s dense bf16 per GPU (datasheet)
# GPU.md, one H100, 14B at 720p: 25.4 s/step for 13,047 TFLOP = 514 TFLOP/s = 52% of 989.
# Assumed: the same fraction of peak on an A100 and on every rank of every layout (per-rank
# GEMMs stay large: 150k x 5120 x 640 at TP=8; attention keeps >= 5 heads over 75,600 tokens).
MFU = 0.52
NVLINK_BUS_BW = 230e9          # B/s effective per-GPU NVLink bandwidth (A100 NVSwitch; NCCL all-reduce bus bw)
A2A_BW = 230e9                 # B/s per-GPU send bandwidth of an all-to-all (assumed equal: same links)
COLLECTIVE_LATENCY = 20e-6     # s fixed cost per collective call (launch + sync)
GPUS = 8
CFG_BATCH = 2                  # conditional + unconditional per step
BF16 = 2
FP32 = 4
#: Layouts compared (tp, ulysses, cfg); the first three are the ones the product asks about.
LAYOUTS = [(8, 1, 1), (1, 8, 1), (1, 4, 2), (4, 1, 2), (4, 2, 1)]

# The tiny profile's CFG-batched window for the CPU measurement: latent (frames, h, w), text tokens.
TINY_LATENT = (11, 8, 14)
TINY_TEXT_LEN = 64


def tokens_720p() -> tuple[int, int, int, int]:
    lat_t = (FRAMES - 1) // VAE_TEMPORAL + 1            # 81 -> 21
    lat_h, lat_w = HEIGHT // VAE_SPATIAL, WIDTH // VAE_SPATIAL   # 90 x 160
    pt, ph, pw = WAN14B["patch"]
    t, h, w = lat_t // pt, lat_h // ph, lat_w // pw     # 21 x 45 x 80
    return t, h, w, t * h * w


def forward_flops(L: int) -> dict[str, float]:
    """Matmul FLOPs (2*m*n*k) of one forward of the 14B transformer on L video tokens, batch 1."""
    d, f, T, n = WAN14B["dim"], WAN14B["ffn"], WAN14B["text_len"], WAN14B["layers"]
    per_block = {
        "self-attn q/k/v/out proj": 4 * 2 * L * d * d,
        "self-attn QK^T + AV": 2 * 2 * L * L * d,
        "cross-attn q/out proj": 2 * 2 * L * d * d,
        "cross-attn k/v proj (text)": 2 * 2 * T * d * d,
        "cross-attn QK^T + AV": 2 * 2 * L * T * d,
        "ffn (2 linears)": 2 * 2 * L * d * f,
    }
    out = {k: v * n for k, v in per_block.items()}
    p = WAN14B["patch"]
    patch_in = WAN14B["in_channels"] * p[0] * p[1] * p[2]
    out["patch embed + proj_out (per token)"] = 2 * L * patch_in * d + 2 * L * d * WAN14B["out_channels"] * p[0] * p[1] * p[2]
    out["text + time embedders"] = (2 * T * (WAN14B["text_dim"] * d + d * d)
                                    + 2 * (WAN14B["freq_dim"] * d + d * d + d * 6 * d))
    return out


def per_rank_flops(L: int, tp: int, ulysses: int, cfg: int) -> float:
    """FLOPs one rank computes per step (CFG batch of 2) under a layout.

    TP splits every block linear and the attention heads; Ulysses splits the tokens (and, inside
    self-attention, the heads); CFG splits the batch.  Not split: the text + time embedders
    (every rank), cross-attention's text k/v projections across Ulysses ranks (each projects
    the whole text), the patch embedding and output head across TP ranks.
    """
    fl = forward_flops(L)
    batch = CFG_BATCH // cfg
    text_kv = fl["cross-attn k/v proj (text)"] / tp
    embedders = fl["text + time embedders"]
    per_token_head = fl["patch embed + proj_out (per token)"] / ulysses
    blocks = sum(v for k, v in fl.items() if k not in (
        "cross-attn k/v proj (text)", "text + time embedders", "patch embed + proj_out (per token)"))
    return batch * (blocks / (tp * ulysses) + text_kv + embedders + per_token_head)


def per_rank_comm(L: int, tp: int, ulysses: int, cfg: int) -> dict[str, tuple[int, float, float]]:
    """(calls, bytes moved per rank, seconds) per step for each collective of a layout.

    Ring all-reduce moves 2(t-1)/t of its payload per rank; an all-to-all sends (u-1)/u of its
    input; an all-gather receives (n-1)/n of its output.  No overlap with compute is assumed.
    """
    d, T, n = WAN14B["dim"], WAN14B["text_len"], WAN14B["layers"]
    batch = CFG_BATCH // cfg
    tokens = L // ulysses
    out_ch = WAN14B["out_channels"] * 4  # proj_out width (16 channels x 2x2 patch)
    rows: dict[str, tuple[int, float, float]] = {}
    if tp > 1:
        ring = 2 * (tp - 1) / tp
        calls = 3 * n
        moved = ring * 3 * n * batch * tokens * d * BF16
        rows["TP row-parallel all-reduce (3/block, bf16)"] = (calls, moved, moved / NVLINK_BUS_BW + calls * COLLECTIVE_LATENCY)
        calls = 4 * n
        moved = ring * n * batch * (3 * tokens + T) * FP32
        rows["TP q/k RMSNorm sum-of-squares (4/block, fp32)"] = (calls, moved, moved / NVLINK_BUS_BW + calls * COLLECTIVE_LATENCY)
    if ulysses > 1:
        calls = 4 * n
        moved = (ulysses - 1) / ulysses * 4 * n * batch * tokens * (d // tp) * BF16
        rows["Ulysses all-to-all q/k/v/out (4/block, bf16)"] = (calls, moved, moved / A2A_BW + calls * COLLECTIVE_LATENCY)
        moved = (ulysses - 1) / ulysses * batch * L * out_ch * BF16
        rows["Ulysses output all-gather (1, bf16)"] = (1, moved, moved / NVLINK_BUS_BW + COLLECTIVE_LATENCY)
    if cfg > 1:
        moved = (cfg - 1) / cfg * CFG_BATCH * L * out_ch * BF16
        rows["CFG output all-gather (1, bf16)"] = (1, moved, moved / NVLINK_BUS_BW + COLLECTIVE_LATENCY)
    return rows


def weight_counts(tp: int) -> tuple[int, int]:
    """(total params, params on one rank at TP=tp) from a meta-device 14B WanTransformer3DModel."""
    import torch
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        m = WanTransformer3DModel(patch_size=WAN14B["patch"], num_attention_heads=WAN14B["heads"],
                                  attention_head_dim=WAN14B["head_dim"], in_channels=16, out_channels=16,
                                  text_dim=WAN14B["text_dim"], freq_dim=WAN14B["freq_dim"],
                                  ffn_dim=WAN14B["ffn"], num_layers=WAN14B["layers"], cross_attn_norm=True,
                                  qk_norm="rms_norm_across_heads")
    total = sum(p.numel() for p in m.parameters())
    sharded = 0
    for block in m.blocks:
        for attn in (block.attn1, block.attn2):
            for lin in (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0]):
                sharded += lin.weight.numel()
            for lin in (attn.to_q, attn.to_k, attn.to_v):  # column-parallel biases are split too
                sharded += lin.bias.numel()
            sharded += attn.norm_q.weight.numel() + attn.norm_k.weight.numel()
        sharded += block.ffn.net[0].proj.weight.numel() + block.ffn.net[0].proj.bias.numel()
        sharded += block.ffn.net[2].weight.numel()
    return total, total - sharded + sharded // tp


def fmt_bytes(b: float) -> str:
    for unit, s in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if b >= s:
            return f"{b / s:,.2f} {unit}"
    return f"{b:.0f} B"


def layout_name(tp: int, ulysses: int, cfg: int) -> str:
    parts = [f"{k}={v}" for k, v in (("tp", tp), ("ulysses", ulysses), ("cfg", cfg)) if v > 1]
    return ",".join(parts) or "one GPU"


def analytic() -> dict[str, dict]:
    """Print the model and return {layout name: prediction}."""
    t, h, w, L = tokens_720p()
    eff_flops = A100_BF16_PEAK * MFU
    print("=" * 96)
    print(f"Wan 2.1 14B, 720p (1280x720, 81 frames) on {GPUS}x A100 NVLink: TP, Ulysses and CFG layouts")
    print("=" * 96)
    print(f"latent {t} x {HEIGHT // VAE_SPATIAL} x {WIDTH // VAE_SPATIAL} (VAE 4x temporal, 8x spatial)"
          f" -> patches {t} x {h} x {w} = {L:,} tokens;  text {WAN14B['text_len']} tokens")
    print(f"dim {WAN14B['dim']}, {WAN14B['heads']} heads x {WAN14B['head_dim']}, ffn {WAN14B['ffn']}, "
          f"{WAN14B['layers']} layers")

    print("\nFLOPs per denoising step (classifier-free guidance = batch of 2: cond + uncond)")
    print(f"  {'component':44s} {'per sample':>14s} {'per step':>14s}")
    fl = forward_flops(L)
    for k, v in fl.items():
        print(f"  {k:44s} {v / 1e12:11,.1f} TF {CFG_BATCH * v / 1e12:11,.1f} TF")
    step_flops = CFG_BATCH * sum(fl.values())
    print(f"  {'TOTAL':44s} {step_flops / CFG_BATCH / 1e15:11,.2f} PF {step_flops / 1e15:11,.2f} PF"
          f"   (GPU.md measures 13,047 TFLOP per step)")
    t1 = step_flops / eff_flops

    print("\nAssumptions:")
    print(f"  one A100: {A100_BF16_PEAK / 1e12:.0f} TFLOP/s bf16 peak x MFU {MFU:.0%} (GPU.md: 14B 720p on one H100, "
          f"25.4 s/step) = {eff_flops / 1e12:.0f} TFLOP/s -> {t1:,.1f} s per step on one GPU")
    print(f"  the same MFU on every rank of every layout; NVLink {NVLINK_BUS_BW / 1e9:.0f} GB/s per GPU for ring "
          f"all-reduce (2(N-1)/N of the payload) and {A2A_BW / 1e9:.0f} GB/s for all-to-all ((N-1)/N sent);")
    print(f"  {COLLECTIVE_LATENCY * 1e6:.0f} us per collective call; no compute/communication overlap; "
          f"layout ranks ordered tp innermost, then ulysses, then cfg (all within one NVSwitch node)")

    results = {}
    try:
        total_params, _ = weight_counts(1)
    except Exception as exc:  # diffusers missing: the rest does not need it
        total_params = None
        print(f"(parameter count skipped: {exc})")
    print(f"\n  {'layout':18s} {'ranks':>5s} {'compute':>9s} {'comm':>8s} {'step':>8s} {'speed-up':>9s} "
          f"{'efficiency':>10s} {'comm share':>10s} {'weights/GPU':>12s} {'moved/rank':>11s}")
    for tp, ulysses, cfg in LAYOUTS:
        ranks = tp * ulysses * cfg
        compute = per_rank_flops(L, tp, ulysses, cfg) / eff_flops
        comm_rows = per_rank_comm(L, tp, ulysses, cfg)
        comm = sum(s for _, _, s in comm_rows.values())
        moved = sum(b for _, b, _ in comm_rows.values())
        step = compute + comm
        weights = None
        if total_params is not None:
            weights = weight_counts(tp)[1] * BF16
        name = layout_name(tp, ulysses, cfg)
        results[name] = {"tp": tp, "ulysses": ulysses, "cfg": cfg, "ranks": ranks, "compute_s": compute,
                         "comm_s": comm, "step_s": step, "speedup": t1 / step, "efficiency": t1 / (ranks * step),
                         "weights_per_gpu": weights, "comm": comm_rows}
        print(f"  {name:18s} {ranks:5d} {compute:8.2f}s {comm:7.3f}s {step:7.2f}s {t1 / step:8.2f}x "
              f"{t1 / (ranks * step):10.1%} {comm / step:10.1%} "
              f"{fmt_bytes(weights) if weights else '-':>12s} {fmt_bytes(moved):>11s}")
    print(f"  {'one GPU':18s} {1:5d} {t1:8.2f}s {0:7.3f}s {t1:7.2f}s {1:8.2f}x {1:10.1%}")

    print("\nCollectives per step per rank:")
    for name, r in results.items():
        for k, (calls, moved, seconds) in r["comm"].items():
            print(f"  {name:18s} {k:48s} {calls:5d} calls {fmt_bytes(moved):>11s} {seconds:7.3f}s")

    asked = [layout_name(*lay) for lay in LAYOUTS[:3]]
    fastest = min(asked, key=lambda k: results[k]["step_s"])
    print(f"\nFastest of {', '.join(asked)} on paper: {fastest} "
          f"({results[fastest]['step_s']:.2f} s/step, {results[fastest]['efficiency']:.1%} efficient; "
          f"50 steps = {50 * results[fastest]['step_s'] / 60:.1f} min; TP=8: {50 * results['tp=8']['step_s'] / 60:.1f} min)")
    try:
        from vidgen_serve.config import PROFILES

        layout = PROFILES["wan2.1-14b-8gpu"].parallel
        chosen = layout_name(layout.tp, layout.ulysses, layout.cfg)
        verdict = "matches" if chosen == fastest else "DIFFERS FROM"
        print(f"profile wan2.1-14b-8gpu uses {chosen}: {verdict} the fastest layout on paper; "
              f"wan2.1-14b-tp8 keeps tp=8 (the product's layout)")
    except Exception as exc:  # noqa: BLE001 - the package is optional for the paper numbers
        print(f"(profile check skipped: {exc})")
    print("Caveats: Ulysses and CFG keep the whole 14B (28.6 GB bf16) on every GPU (80 GB cards); with "
          "guidance_scale 1 there is no unconditional pass and CFG=2's second rank set repeats the first.")
    return results


def measure(repeats: int, warmup: int) -> None:
    """Tiny transformer, one rank vs TP=2 on this CPU (gloo), through parallel_check."""
    from parallel_check import MODELS, report, run_layouts

    spec = {"model": "tiny", "config": MODELS["tiny"], "latent": TINY_LATENT, "text_len": TINY_TEXT_LEN,
            "dtype": "float32", "tokens": TINY_LATENT[0] * (TINY_LATENT[1] // 2) * (TINY_LATENT[2] // 2),
            "cpu": True, "warmup": warmup, "repeats": repeats, "device_name": "cpu"}
    doc = report(spec, run_layouts(spec, [{"tp": 2}]))
    print("\n" + "=" * 78)
    print(f"Measured on this CPU ({os.cpu_count()} cores, gloo, one thread per rank): tiny transformer, CFG batch of 2, "
          f"latent {TINY_LATENT}, {spec['tokens']} tokens")
    print("=" * 78)
    for row in doc["layouts"]:
        print(f"  {row['layout']:12s} {row['ranks']} rank(s)  step {row['step_s'] * 1e3:8.2f} ms  "
              f"max |diff| vs one rank {row['max_abs_diff']:.2e}")
    print("  Note: the tiny model is latency-bound (7 all-reduces per layer on 2 cores): TP on CPU shows "
          "the overhead, not the 14B speed-up.")


def measure_group(runs: int) -> None:
    """Whole denoising steps (CFG batch, scheduler step, Ray round trip) through the serving
    path: the in-process ``Denoiser`` (TP=1) vs ``ParallelDenoiser`` (TP=2 Ray actors)."""
    import time

    from vidgen_serve.config import AppConfig
    from vidgen_serve.parallel.local import LocalParallelDenoiser
    from vidgen_serve.pipeline import Denoiser, TextEncoder
    from vidgen_serve.plan import build_plan
    from vidgen_serve.request import parse_request

    config = AppConfig()
    plan = build_plan(parse_request({"prompt": "a cat", "duration": 2, "resolution": "480p", "seed": 7}), config)
    emb = TextEncoder(config).encode(plan)

    def step_times(denoiser) -> list[float]:
        times = []
        for _ in range(runs):
            run = denoiser.start(plan, emb)
            while not run.done:
                t0 = time.perf_counter()
                run.advance()
                times.append(time.perf_counter() - t0)
            run.latents()
        return times

    tp1 = step_times(Denoiser(config))
    tp2_denoiser = LocalParallelDenoiser(AppConfig(profile_overrides={"parallel": {"tp": 2}}))
    try:
        step_times(tp2_denoiser)  # warm-up
        tp2 = step_times(tp2_denoiser)
    finally:
        tp2_denoiser.close()
    print("\n" + "=" * 78)
    print(f"Whole denoising step, tiny profile 2 s 480p (1 window, CFG batch 2), {runs} runs x "
          f"{plan.num_inference_steps} steps")
    print("=" * 78)
    for name, ts in (("TP=1 in-process Denoiser", tp1), ("TP=2 ParallelDenoiser", tp2)):
        ts = sorted(ts)
        print(f"  {name:30s} median {ts[len(ts) // 2] * 1e3:8.2f} ms   min {ts[0] * 1e3:8.2f} ms")
    print("  TP=2 includes a Ray actor round trip per step (~ms): negligible next to a 14B step.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-measure", action="store_true", help="analytic part only")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--group", action="store_true",
                    help="also time whole denoising steps through ParallelDenoiser (local Ray)")
    ap.add_argument("--group-runs", type=int, default=5)
    args = ap.parse_args()
    analytic()
    if not args.skip_measure:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        measure(args.repeats, args.warmup)
    if args.group:
        measure_group(args.group_runs)


if __name__ == "__main__":
    main()
