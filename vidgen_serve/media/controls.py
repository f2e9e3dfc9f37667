"""Post-processing creative controls: camera move, colour grade, deflicker.

- camera_motion: a move of a virtual camera over the rendered (over-scanned) frames, done after the
  frame-rate conversion (on the output clock, at the native size, before the upscale): every output
  frame gets its own window on one continuous path, however the interpolation was split into
  chunks. Each frame shows a window of the rendered frame, resampled
  (bicubic, sub-pixel, `torch.nn.functional.affine_grid`/`grid_sample`) back to the full size:
  `pan` slides a window of `1 - PAN_OVERSCAN` of the width from the left edge to the right edge at a
  constant speed; `zoom` shrinks a centred window geometrically from the full frame to
  `ZOOM_END` of it (a constant scale ratio per frame: a steady zoom in). `static`: frames untouched.
- color_palette: ffmpeg's `colortemperature` filter (the frame as lit at that temperature in Kelvin):
  warm = 4000 K, cool = 10000 K; neutral: no filter.
- temporal_consistency: ffmpeg's `deflicker` (each frame's brightness pulled to the mean of a moving
  window of `size` frames) above the default consistency, with a window growing with it; none at or
  below the default (0.85), whose output stays as it was.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

PAN_OVERSCAN = 0.2  # the pan's window is 80% of the rendered width and travels the other 20%
ZOOM_END = 0.7  # the zoom's window ends at 70% of the rendered frame (1.43x closer)
COLOR_TEMPERATURE_K = {"warm": 4000, "cool": 10000}  # neutral: no grade
DEFAULT_CONSISTENCY = 0.85
MAX_DEFLICKER_SIZE = 9  # frames averaged by deflicker at temporal_consistency 1.0
CAMERA_BATCH_FRAMES = 16  # frames resampled at once by the camera move


def color_temperature(palette: str) -> int | None:
    """Kelvin of the grade for `palette` (None: neutral, no grade)."""
    if palette == "neutral":
        return None
    if palette not in COLOR_TEMPERATURE_K:
        raise ValueError(f"color_palette={palette!r}; valid: {['neutral', *COLOR_TEMPERATURE_K]}")
    return COLOR_TEMPERATURE_K[palette]


def deflicker_size(temporal_consistency: float) -> int:
    """Frames in deflicker's moving window (0: no deflicker): 3 just above 0.85, up to 9 at 1.0."""
    excess = (float(temporal_consistency) - DEFAULT_CONSISTENCY) / (1.0 - DEFAULT_CONSISTENCY)
    if excess <= 1e-9:
        return 0
    return 3 + round(min(1.0, excess) * (MAX_DEFLICKER_SIZE - 3) / 2) * 2


def camera_windows(num_frames: int, motion: str, span: int | None = None) -> torch.Tensor:
    """Per-frame affine maps (num_frames, 2, 3) from output to rendered coordinates (normalised -1..1).

    Row [s, 0, cx; 0, s, 0]: the frame shows the rendered frame's window of relative size `s`
    centred at `cx`. The move runs from frame 0 to frame `span - 1` (default: the last one);
    frames past it hold the end position.
    """
    span = num_frames if span is None else span
    t = (torch.arange(num_frames, dtype=torch.float64) / max(1, span - 1)).clamp(max=1.0)
    if motion == "pan":
        scale = torch.full_like(t, 1.0 - PAN_OVERSCAN)
        cx = (2 * t - 1) * PAN_OVERSCAN  # the window's centre, left edge to right edge
    elif motion == "zoom":
        scale = ZOOM_END ** t
        cx = torch.zeros_like(t)
    else:
        raise ValueError(f"camera_motion={motion!r}; valid: ['static', 'pan', 'zoom']")
    theta = torch.zeros(num_frames, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = scale
    theta[:, 1, 1] = scale
    theta[:, 0, 2] = cx
    return theta


def camera_move(frames: np.ndarray, motion: str, span: int | None = None) -> np.ndarray:
    """Apply the camera move `motion` to frames (N, H, W, 3) uint8; `static` returns them unchanged.

    `span`: frames the move spans (see `camera_windows`).
    """
    if motion == "static" or len(frames) == 0:
        return frames
    n, height, width, _ = frames.shape
    theta = camera_windows(n, motion, span).float()
    out = np.empty_like(frames)
    with torch.inference_mode():
        for start in range(0, n, CAMERA_BATCH_FRAMES):  # bounded memory: float copies of a few frames at a time
            end = min(n, start + CAMERA_BATCH_FRAMES)
            x = torch.from_numpy(np.ascontiguousarray(frames[start:end])).permute(0, 3, 1, 2).float()
            grid = F.affine_grid(theta[start:end], [end - start, 3, height, width], align_corners=False)
            moved = F.grid_sample(x, grid, mode="bicubic", padding_mode="border", align_corners=False)
            out[start:end] = moved.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out
