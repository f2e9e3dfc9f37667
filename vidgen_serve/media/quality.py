"""Per-video quality metrics: temporal SSIM, temporal PSNR and a flicker score.

All three compare each frame with the next one (F frames give F - 1 pairs) and average over
the pairs; they say how steady a video is from frame to frame, not how good each frame is.

- `temporal_ssim`: mean SSIM (Wang et al. 2004) between consecutive frames, per RGB channel
  and averaged over the channels. Parameters are those of the paper and of scikit-image's
  `structural_similarity(a, b, channel_axis=-1, gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=255)`, which it agrees with (within 1e-3): an 11x11
  Gaussian window (sigma 1.5, truncated at 3.5 sigma), K1 = 0.01, K2 = 0.03, population
  covariances, and the SSIM map averaged over the pixels whose window lies inside the frame.
  1.0 = consecutive frames are identical.
- `temporal_psnr_db`: mean PSNR (dB) between consecutive frames, 10 log10(255^2 / MSE) with the
  MSE over all pixels and channels. A pair of identical frames has no finite PSNR: each pair is
  capped at `PSNR_CAP_DB` (100 dB), so a still video scores exactly 100 and JSON stays valid.
- `flicker`: VBench's `temporal_flickering` score, (255 - mean MAE) / 255, where MAE is the mean
  absolute difference between consecutive frames over all pixels and channels, averaged over
  the pairs. 1.0 = no change between frames; lower = more flicker (or motion).

The work is vectorised in torch (a separable Gaussian convolution on batches of frame pairs,
bounded in memory) and runs on the device it is given (the Decoder's).
"""

from __future__ import annotations

import math

import numpy as np
import torch

PSNR_CAP_DB = 100.0
SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
DATA_RANGE = 255.0
METRICS = ("temporal_ssim", "temporal_psnr_db", "flicker")
HEADER = "X-Vidgen-Quality"
# Frame pairs per batch: the SSIM of a batch holds ~20 float32 copies of its frames.
_BATCH_BYTES = 512 * 1024 * 1024


def _gaussian_window(device: torch.device) -> torch.Tensor:
    """The 1-D Gaussian of `scipy.ndimage.gaussian_filter` (sigma 1.5, truncate 3.5): 11 taps, sum 1."""
    radius = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * (x / SSIM_SIGMA) ** 2)
    return (w / w.sum()).to(device, torch.float32)


def _ssim_per_pair(frames: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Mean SSIM of each pair (frames[i], frames[i + 1]) of float frames (n + 1, 3, H, W) in 0..255:
    (n,), averaged over the channels."""
    m, c, h, w = frames.shape
    n, k = m - 1, window.numel()
    x, y = frames[:-1], frames[1:]
    # The local statistics, filtered at once ("valid" convolution: only pixels whose window lies
    # inside the frame, as skimage's crop keeps). Each frame's mean and mean square serve both
    # pairs it belongs to: 2 (n + 1) + n filtered planes per channel instead of 5 n. Every plane
    # is one channel of a depthwise (grouped) convolution: on CPU, oneDNN's depthwise kernel is
    # ~8x faster than a one-channel convolution over a batch of planes.
    planes = (3 * n + 2) * c
    stack = torch.cat((frames, frames * frames, x * y)).reshape(1, planes, h, w)
    filtered = torch.nn.functional.conv2d(stack, window.view(1, 1, k, 1).expand(planes, 1, k, 1), groups=planes)
    filtered = torch.nn.functional.conv2d(filtered, window.view(1, 1, 1, k).expand(planes, 1, 1, k), groups=planes)
    filtered = filtered.reshape(3 * n + 2, c, h - k + 1, w - k + 1)
    mu, mu2, uxy = filtered[:m], filtered[m:2 * m], filtered[2 * m:]
    ux, uy = mu[:-1], mu[1:]
    vx, vy = mu2[:-1] - ux * ux, mu2[1:] - uy * uy
    vxy = uxy - ux * uy
    c1, c2 = (SSIM_K1 * DATA_RANGE) ** 2, (SSIM_K2 * DATA_RANGE) ** 2
    ssim_map = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return ssim_map.mean(dim=(2, 3), dtype=torch.float64).mean(dim=1)


def quality_metrics(frames: np.ndarray, device: str | torch.device = "cpu") -> dict[str, float]:
    """Temporal SSIM, temporal PSNR (dB, capped) and VBench's flicker score of a video.

    Args:
        frames: uint8 frames (F, H, W, 3); H and W at least 11 (the SSIM window).
        device: where to compute (the frames are copied there batch by batch).

    Returns:
        {"temporal_ssim", "temporal_psnr_db", "flicker"}; empty for a video of fewer than 2 frames.
    """
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames (F, H, W, 3), got {frames.dtype} {frames.shape}")
    num, height, width, _ = frames.shape
    if num < 2:
        return {}
    device = torch.device(device)
    window = _gaussian_window(device)
    if min(height, width) < window.numel():
        raise ValueError(f"frames of {width}x{height} are smaller than the {window.numel()}-pixel SSIM window")
    pairs = num - 1
    batch = max(1, min(pairs, _BATCH_BYTES // (20 * 4 * 3 * height * width)))
    ssim = torch.empty(pairs, dtype=torch.float64)
    mse = torch.empty(pairs, dtype=torch.float64)
    mae = torch.empty(pairs, dtype=torch.float64)
    source = torch.from_numpy(np.ascontiguousarray(frames))
    with torch.inference_mode():
        for start in range(0, pairs, batch):
            stop = min(pairs, start + batch)
            # (n + 1) frames -> n consecutive pairs, channels first.
            chunk = source[start:stop + 1].to(device).permute(0, 3, 1, 2).float()
            diff = chunk[1:] - chunk[:-1]
            mse[start:stop] = (diff * diff).mean(dim=(1, 2, 3), dtype=torch.float64).cpu()
            mae[start:stop] = diff.abs().mean(dim=(1, 2, 3), dtype=torch.float64).cpu()
            ssim[start:stop] = _ssim_per_pair(chunk, window).cpu()
    # Per pair: 10 log10(255^2 / MSE), capped (an MSE of 0 gives +inf, then the cap).
    psnr = (10 * torch.log10(DATA_RANGE ** 2 / mse)).clamp(max=PSNR_CAP_DB)
    return {
        "temporal_ssim": float(ssim.mean()),
        "temporal_psnr_db": float(psnr.mean()),
        "flicker": float((DATA_RANGE - mae.mean()) / DATA_RANGE),
    }


def quality_header(quality: dict[str, float]) -> dict[str, str]:
    """``{X-Vidgen-Quality: "temporal_ssim=0.9310;temporal_psnr_db=27.41;flicker=0.9820"}``
    (Server-Timing-like name=value pairs); no header when there are no metrics."""
    parts = [f"{name}={quality[name]:.2f}" if name == "temporal_psnr_db" else f"{name}={quality[name]:.4f}"
             for name in METRICS if name in quality and math.isfinite(quality[name])]
    return {HEADER: ";".join(parts)} if parts else {}


def parse_quality_header(value: str) -> dict[str, float]:
    """The metrics of an `X-Vidgen-Quality` header value (what a client does with it)."""
    out = {}
    for part in value.split(";"):
        name, sep, number = part.strip().partition("=")
        if sep:
            out[name] = float(number)
    return out
