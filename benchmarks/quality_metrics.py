"""Cost of the per-video quality metrics (`media.quality`) relative to the decode stage.

  tiny        the tiny profile, end to end: the Decoder's VAE decode vs the quality metrics of
              the frames it produced (the same call order as `Decoder.decode`)
  <W>x<H>xF   the metrics alone on synthetic native frames of the real profiles' sizes (81 frames:
              one Wan 2.1 window at 832x480 and 1280x720), on this machine's CPU and, when there
              is one, its GPU (where the Decoder of a real profile runs them)

Run: ``python benchmarks/quality_metrics.py`` (``--json out.json``; ``--sizes`` to pick).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)


def _best_of(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def tiny_ratio(repeat: int) -> dict:
    from vidgen_serve.config import AppConfig
    from vidgen_serve.media.quality import quality_metrics
    from vidgen_serve.pipeline import VideoPipeline
    from vidgen_serve.plan import build_plan
    from vidgen_serve.request import VideoRequest

    config = AppConfig()
    pipeline = VideoPipeline(config)
    plan = build_plan(VideoRequest(prompt="a red fox running through snow", duration=5, resolution="720p",
                                   num_inference_steps=2, seed=1), config)
    latents = pipeline.denoiser.denoise(plan, pipeline.text_encoder.encode(plan))
    frames = pipeline.decoder.decode_latents(plan, latents)
    decode_s = _best_of(lambda: pipeline.decoder.decode_latents(plan, latents), repeat)
    quality_s = _best_of(lambda: quality_metrics(frames, pipeline.decoder.device), repeat)
    return {"case": "tiny", "frames": list(frames.shape), "vae_decode_s": decode_s, "quality_s": quality_s,
            "quality_over_vae_decode": quality_s / decode_s}


def synthetic(width: int, height: int, num: int, device: str, repeat: int) -> dict:
    import numpy as np
    import torch

    from vidgen_serve.media.quality import quality_metrics

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (1, height, width, 3)).astype(np.int16)
    frames = np.clip(base + rng.integers(-8, 9, (num, height, width, 3)), 0, 255).astype(np.uint8)
    quality_metrics(frames[:2], device)  # warm-up (kernels, CUDA context)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = _best_of(lambda: quality_metrics(frames, device), repeat)
    return {"case": f"{width}x{height}x{num}", "device": device, "quality_s": seconds,
            "ms_per_frame": 1000 * seconds / num}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="832x480x81,1280x720x81")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    import torch

    results = [tiny_ratio(args.repeat)]
    print(json.dumps(results[-1]))
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for size in filter(None, args.sizes.split(",")):
        width, height, num = (int(v) for v in size.split("x"))
        for device in devices:
            results.append(synthetic(width, height, num, device, args.repeat))
            print(json.dumps(results[-1]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch_threads": torch.get_num_threads(), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
