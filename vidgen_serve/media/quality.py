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
import warnings

import numpy as np
import torch

PSNR_CAP_DB = 100.0
SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
DATA_RANGE = 255.0
METRICS = ("temporal_ssim", "temporal_psnr_db", "flicker")
HEADER = "X-Vidgen-Quality"
# Frame pairs per batch: the SSIM of a batch holds ~12 float32 copies of its frames.
_BATCH_BYTES = 256 * 1024 * 1024


def _gaussian_window(device: torch.device) -> torch.Tensor:
    """The 1-D Gaussian of `scipy.ndimage.gaussian_filter` (sigma 1.5, truncate 3.5): 11 taps, sum 1."""
    radius = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * (x / SSIM_SIGMA) ** 2)
    return (w / w.sum()).to(device, torch.float32)


def _ssim_per_pair(x: torch.Tensor, y: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Mean SSIM of each (x[i], y[i]) for float frames (n, 3, H, W) in 0..255: (n,), channel-averaged."""
    n, c, h, w = x.shape
    k = window.numel()
    # The five local statistics of every channel of every pair, filtered at once ("valid"
    # convolution: only pixels whose window lies inside the frame, as skimage's crop keeps).
    stack = torch.stack((x, y, x * x, y * y, x * y)).reshape(5 * n * c, 1, h, w)
    filtered = torch.nn.functional.conv2d(stack, window.view(1, 1, k, 1))
    filtered = torch.nn.functional.conv2d(filtered, window.view(1, 1, 1, k))
    ux, uy, uxx, uyy, uxy = filtered.reshape(5, n, c, h - k + 1, w - k + 1)
    vx, vy, vxy = uxx - ux * ux, uyy - uy * uy, uxy - ux * uy
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
    batch = max(1, min(pairs, _BATCH_BYTES // (12 * 4 * 3 * height * width)))
    ssim = torch.empty(pairs, dtype=torch.float64)
    mse = torch.empty(pairs, dtype=torch.float64)
    mae = torch.empty(pairs, dtype=torch.float64)
    source = torch.from_numpy(np.ascontiguousarray(frames))
    # On CPU, oneDNN's convolution is ~10x slower than the native kernel for one-channel
    # inputs like these (as in the Decoder's VAE decode): the native kernels.
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # flags() warns about TF32 on Intel GPUs
        with torch.backends.mkldnn.flags(enabled=device.type != "cpu"):
            for start in range(0, pairs, batch):
                stop = min(pairs, start + batch)
                # (n + 1) frames -> n consecutive pairs, channels first.
                chunk = source[start:stop + 1].to(device).permute(0, 3, 1, 2).float()
                x, y = chunk[:-1], chunk[1:]
                diff = y - x
                mse[start:stop] = (diff * diff).mean(dim=(1, 2, 3), dtype=torch.float64).cpu()
                mae[start:stop] = diff.abs().mean(dim=(1, 2, 3), dtype=torch.float64).cpu()
                ssim[start:stop] = _ssim_per_pair(x, y, window).cpu()
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
