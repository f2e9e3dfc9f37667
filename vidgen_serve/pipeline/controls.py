"""Denoiser-side creative controls: motion intensity (initial-noise correlation) and seam blending.

motion_intensity: every latent frame's initial noise is a mix of its own noise and one component
shared by all frames, x_f = sqrt(1 - |a|) * eps_f + sqrt(|a|) * s_f * shared, so every element
keeps unit variance and the consecutive-frame correlation is a:
  - intensity < 1: a > 0 (s_f = 1), frames start closer together: less motion (0.1 -> a = 0.95);
  - intensity = 1: a = 0, independent frames: exactly the plain seeded noise (no extra draw);
  - intensity > 1: a < 0 (s_f = (-1)^f), neighbouring frames start anti-correlated: more change
    between frames (1.5 -> a = -0.6).
The shared component is drawn from the same seeded generator after the per-frame noise, so a seed
still gives the same frames.

temporal_consistency: the blend weights of neighbouring windows across an overlap. Up to the default
(0.85) the ramp is linear (today's blend); above it the ramp bends towards a raised cosine, whose
zero slope at both ends lets a window's contribution fade in and out without a kink.
"""

from __future__ import annotations

import math

import torch

MAX_SHARED = 0.95  # correlation of neighbouring frames' noise at the lowest intensity (0.1)
MAX_ANTI = 0.6  # anti-correlation at the highest intensity (1.5)
MIN_INTENSITY, MAX_INTENSITY = 0.1, 1.5
DEFAULT_CONSISTENCY = 0.85


def noise_correlation(intensity: float) -> float:
    """Correlation of neighbouring latent frames' initial noise for a motion intensity (0.1..1.5)."""
    intensity = min(MAX_INTENSITY, max(MIN_INTENSITY, float(intensity)))
    if intensity <= 1.0:
        return MAX_SHARED * (1.0 - intensity) / (1.0 - MIN_INTENSITY)
    return -MAX_ANTI * (intensity - 1.0) / (MAX_INTENSITY - 1.0)


def correlate_frames(eps: torch.Tensor, intensity: float, generator: torch.Generator) -> torch.Tensor:
    """Mix a shared component into per-frame noise `eps` (B, C, F, H, W) for `intensity`.

    Intensity 1.0 returns `eps` itself (nothing drawn). Otherwise one more (B, C, 1, H, W) draw
    from `generator` is mixed in; every element keeps unit variance.
    """
    a = noise_correlation(intensity)
    if a == 0.0:
        return eps
    shared = torch.randn((*eps.shape[:2], 1, *eps.shape[3:]), generator=generator, dtype=eps.dtype)
    if a < 0:
        sign = torch.tensor([(-1.0) ** f for f in range(eps.shape[2])], dtype=eps.dtype)
        shared = shared * sign.view(1, 1, -1, 1, 1)
    return math.sqrt(1.0 - abs(a)) * eps + math.sqrt(abs(a)) * shared


def seam_ramp(overlap: int, temporal_consistency: float = DEFAULT_CONSISTENCY) -> torch.Tensor:
    """Rising blend weights (0, 1) of a window entering an overlap of `overlap` latent frames.

    Linear up to the default consistency (0.85); from there to 1.0 it moves to a raised cosine.
    """
    t = torch.arange(1, overlap + 1, dtype=torch.float32) / (overlap + 1)
    bend = min(1.0, max(0.0, (temporal_consistency - DEFAULT_CONSISTENCY) / (1.0 - DEFAULT_CONSISTENCY)))
    if bend == 0.0:
        return t
    cosine = 0.5 - 0.5 * torch.cos(math.pi * t)
    return (1.0 - bend) * t + bend * cosine
