"""Paper numbers for the tensor-parallel denoiser.

1. Analytic model of Wan 2.1 14B at 720p (1280x720, 81 frames): FLOPs per denoising step,
   all-reduce bytes per step per rank for TP=8, and the predicted TP=8 parallel efficiency on
   8x A100 (NVLink), with every assumption printed.
2. A measurement on this machine's CPU: step time of the tiny profile transformer with TP=1 and
   TP=2 (2 local gloo ranks), at the tiny profile's CFG-batched window.
3. With ``--group``: whole denoising steps through the serving path, the in-process
   ``Denoiser`` (TP=1) vs ``TensorParallelDenoiser`` (TP=2 Ray worker actors).

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
A100_BF16_PEAK = 312e12        # FLOP/s dense bf16 per GPU
MFU = 0.50                     # achieved fraction of peak in the denoiser's matmuls/attention
NVLINK_BUS_BW = 230e9          # B/s effective ring all-reduce bus bandwidth (A100 NVLink/NVSwitch)
ALLREDUCE_LATENCY = 20e-6      # s fixed cost per all-reduce call (launch + sync)
TP = 8
BF16 = 2
FP32 = 4

# Tiny profile (the project's CPU profile) for the measurement.
TINY_CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=12, in_channels=16,
                   out_channels=16, text_dim=32, freq_dim=256, ffn_dim=64, num_layers=2,
                   cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=64)
TINY_HIDDEN = (2, 16, 11, 8, 14)   # CFG-batched latent window (batch 2 = cond + uncond)
TINY_TEXT = (2, 64, 32)


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
    out["embed/head (patch, text, time, proj_out)"] = (
        2 * L * patch_in * d + 2 * L * d * WAN14B["out_channels"] * p[0] * p[1] * p[2]
        + 2 * T * (WAN14B["text_dim"] * d + d * d) + 2 * (WAN14B["freq_dim"] * d + d * d + d * 6 * d)
    )
    return out


def allreduce_per_forward(L: int) -> dict[str, tuple[int, int]]:
    """(calls, bytes) of the all-reduces one rank does per forward (batch 1) under TP."""
    d, T, n = WAN14B["dim"], WAN14B["text_len"], WAN14B["layers"]
    return {
        # row-parallel outputs, bf16: attn1.to_out.0, attn2.to_out.0, ffn.net.2
        "row-parallel outputs (3/block, L x dim bf16)": (3 * n, 3 * n * L * d * BF16),
        # DistributedRMSNorm sum of squares, fp32, one value per token:
        # attn1 norm_q + norm_k (L each), attn2 norm_q (L) + norm_k (T text tokens)
        "RMSNorm sum-of-squares (4/block, fp32/token)": (4 * n, n * (3 * L + T) * FP32),
    }


def param_counts() -> tuple[int, int]:
    """(total params, params on one rank at TP=8) from a meta-device 14B WanTransformer3DModel."""
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
    return total, total - sharded + sharded // TP


def fmt_bytes(b: float) -> str:
    for unit, s in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if b >= s:
            return f"{b / s:,.2f} {unit}"
    return f"{b:.0f} B"


def analytic() -> None:
    t, h, w, L = tokens_720p()
    print("=" * 78)
    print("Wan 2.1 14B, 720p (1280x720, 81 frames), tensor parallel TP=8 on 8x A100 NVLink")
    print("=" * 78)
    print(f"latent {t} x {HEIGHT // VAE_SPATIAL} x {WIDTH // VAE_SPATIAL} (VAE 4x temporal, 8x spatial)"
          f" -> patches {t} x {h} x {w} = {L:,} tokens;  text {WAN14B['text_len']} tokens")
    print(f"dim {WAN14B['dim']}, {WAN14B['heads']} heads x {WAN14B['head_dim']}, ffn {WAN14B['ffn']}, "
          f"{WAN14B['layers']} layers")
    try:
        total, per_rank = param_counts()
        print(f"parameters: {total / 1e9:.2f} B = {fmt_bytes(total * BF16)} bf16;  "
              f"per rank at TP={TP}: {per_rank / 1e9:.2f} B = {fmt_bytes(per_rank * BF16)} "
              f"({per_rank / total:.3f} of the model)")
    except Exception as exc:  # diffusers missing: the rest does not need it
        print(f"(parameter count skipped: {exc})")

    print("\nFLOPs per denoising step (classifier-free guidance = 2 forwards: cond + uncond)")
    print(f"  {'component':44s} {'per forward':>14s} {'per step':>14s}")
    fl = forward_flops(L)
    for k, v in fl.items():
        print(f"  {k:44s} {v / 1e12:11,.1f} TF {2 * v / 1e12:11,.1f} TF")
    fwd = sum(fl.values())
    step_flops = 2 * fwd
    print(f"  {'TOTAL':44s} {fwd / 1e15:11,.2f} PF {step_flops / 1e15:11,.2f} PF")

    print(f"\nAll-reduce traffic per step per rank, TP={TP} (x2 forwards for CFG; activations bf16)")
    print(f"  {'collective':46s} {'calls':>7s} {'payload':>12s} {'ring bytes':>12s}")
    ring = 2 * (TP - 1) / TP
    calls_step = 0
    payload_step = 0
    for k, (calls, nbytes) in allreduce_per_forward(L).items():
        print(f"  {k:46s} {2 * calls:7d} {fmt_bytes(2 * nbytes):>12s} {fmt_bytes(2 * nbytes * ring):>12s}")
        calls_step += 2 * calls
        payload_step += 2 * nbytes
    print(f"  {'TOTAL':46s} {calls_step:7d} {fmt_bytes(payload_step):>12s} "
          f"{fmt_bytes(payload_step * ring):>12s}")
    print(f"  (one row-parallel all-reduce = {L:,} x {WAN14B['dim']} x 2 B = "
          f"{fmt_bytes(L * WAN14B['dim'] * BF16)}; ring sends 2(N-1)/N = {ring:.3f} of the payload per rank)")

    eff_flops = A100_BF16_PEAK * MFU
    t1 = step_flops / eff_flops
    t_comp = t1 / TP
    t_comm = payload_step * ring / NVLINK_BUS_BW + calls_step * ALLREDUCE_LATENCY
    t_tp = t_comp + t_comm
    eff = t1 / (TP * t_tp)
    print("\nPrediction (assumptions):")
    print(f"  A100 bf16 peak {A100_BF16_PEAK / 1e12:.0f} TFLOP/s at {MFU:.0%} MFU -> "
          f"{eff_flops / 1e12:.0f} TFLOP/s per GPU; compute splits evenly over {TP} ranks")
    print(f"  ring all-reduce time = 2(N-1)/N x bytes / {NVLINK_BUS_BW / 1e9:.0f} GB/s + "
          f"{ALLREDUCE_LATENCY * 1e6:.0f} us per call; no compute/communication overlap")
    print(f"  {'':4s}{'quantity':38s} {'value':>12s}")
    rows = [
        ("step time, 1 GPU (compute only)", f"{t1:,.2f} s"),
        (f"step time, TP={TP}: compute", f"{t_comp:,.2f} s"),
        (f"step time, TP={TP}: all-reduce", f"{t_comm:,.2f} s"),
        (f"step time, TP={TP}: total", f"{t_tp:,.2f} s"),
        ("speedup vs 1 GPU", f"{t1 / t_tp:,.2f} x"),
        (f"parallel efficiency T1 / (N x T{TP})", f"{eff:.1%}"),
        ("communication share of a TP step", f"{t_comm / t_tp:.1%}"),
        ("50-step video, TP=8 (denoiser only)", f"{50 * t_tp / 60:,.1f} min"),
    ]
    for k, v in rows:
        print(f"    {k:38s} {v:>12s}")


def measure(repeats: int, warmup: int) -> None:
    import torch
    from diffusers import WanTransformer3DModel

    from vidgen_serve.parallel import run_local_tp_group, sharded_forward_worker

    torch.manual_seed(0)
    model = WanTransformer3DModel(**TINY_CONFIG).eval()
    state_dict = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(*TINY_HIDDEN, generator=g),
                  timestep=torch.tensor([750, 750]),
                  encoder_hidden_states=torch.randn(*TINY_TEXT, generator=g))
    cores = os.cpu_count() or 1
    print("\n" + "=" * 78)
    print(f"Measured on this CPU ({cores} cores, gloo): tiny transformer, hidden_states {TINY_HIDDEN}, "
          f"encoder_hidden_states {TINY_TEXT}")
    print("=" * 78)
    res = {}
    for tp in (1, 2):
        threads = max(1, cores // tp)
        res[tp] = run_local_tp_group(sharded_forward_worker, tp, TINY_CONFIG, state_dict, inputs,
                                     torch.float32, repeats, warmup, timeout=600, threads_per_rank=threads)
        res[tp]["threads"] = threads
    diff = (res[2]["output"] - res[1]["output"]).abs().max().item()
    print(f"  {'config':22s} {'threads/rank':>12s} {'step (min of ' + str(repeats) + ')':>18s} "
          f"{'params/rank':>12s}")
    for tp in (1, 2):
        r = res[tp]
        print(f"  {'TP=' + str(tp):22s} {r['threads']:12d} {r['step_s'] * 1e3:15.2f} ms "
              f"{fmt_bytes(r['param_bytes']):>12s}")
    ratio = res[2]["step_s"] / res[1]["step_s"]
    print(f"  TP=2 / TP=1 step-time ratio: {ratio:.2f}  (speedup {1 / ratio:.2f}x; "
          f"max |out_TP2 - out_TP1| = {diff:.2e})")
    print("  Note: the tiny model (dim 48, 308 tokens/sample) is latency-bound; each forward does "
          "2 layers x 7 gloo all-reduces, so TP on CPU shows the overhead, not the 14B speedup.")


def measure_group(runs: int) -> None:
    """Whole denoising steps (CFG batch, scheduler step, Ray round trip) through the serving
    path: the in-process ``Denoiser`` (TP=1) vs ``TensorParallelDenoiser`` (TP=2 Ray actors)."""
    import time

    from vidgen_serve.config import AppConfig
    from vidgen_serve.parallel.local import LocalTensorParallelDenoiser
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
    tp2_denoiser = LocalTensorParallelDenoiser(AppConfig(profile_overrides={"tensor_parallel_size": 2}))
    try:
        step_times(tp2_denoiser)  # warm-up
        tp2 = step_times(tp2_denoiser)
    finally:
        tp2_denoiser.close()
    print("\n" + "=" * 78)
    print(f"Whole denoising step, tiny profile 2 s 480p (1 window, CFG batch 2), {runs} runs x "
          f"{plan.num_inference_steps} steps")
    print("=" * 78)
    for name, ts in (("TP=1 in-process Denoiser", tp1), ("TP=2 TensorParallelDenoiser", tp2)):
        ts = sorted(ts)
        print(f"  {name:30s} median {ts[len(ts) // 2] * 1e3:8.2f} ms   min {ts[0] * 1e3:8.2f} ms")
    print("  TP=2 includes a Ray actor round trip per step (~ms): negligible next to a 14B step.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-measure", action="store_true", help="analytic part only")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--group", action="store_true",
                    help="also time whole denoising steps through TensorParallelDenoiser (local Ray)")
    ap.add_argument("--group-runs", type=int, default=5)
    args = ap.parse_args()
    analytic()
    if not args.skip_measure:
        measure(args.repeats, args.warmup)
    if args.group:
        measure_group(args.group_runs)


if __name__ == "__main__":
    main()
