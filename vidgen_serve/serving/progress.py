"""Overall progress of a generation: one fraction (0..1) and an ETA across all stages.

The stages report their own progress (the denoiser per (step, window) unit, the decoder
per phase: `vae_decode` per latent frame, then `encode`); a job's record shows those and,
from them, an overall fraction that only moves forward and an estimate of the time left.

How much of a generation each stage takes depends on the profile and the request (on
GPUs the denoiser dominates; with the tiny CPU profile the decode and the H.264 encode
do), so the stage shares are learned from the timings of generations this replica
finished (a moving average), starting from a rough default.
"""

from __future__ import annotations

import time
from typing import Any, Callable

# Rough shares of a generation's time per stage before any generation has finished.
DEFAULT_SHARES = {"text_encode": 0.05, "denoise": 0.55, "vae_decode": 0.15, "encode": 0.25}
STAGES = tuple(DEFAULT_SHARES)


class StageShares:
    """Each stage's share of a generation's wall time, learned from finished generations.

    Args:
        alpha: weight of each finished generation in the moving average.
    """

    def __init__(self, alpha: float = 0.3) -> None:
        self.alpha = alpha
        self.shares = dict(DEFAULT_SHARES)

    def observe(self, timings: dict[str, float]) -> None:
        """Learn from a finished generation's per-stage seconds (the `Server-Timing` stages)."""
        seconds = {s: max(0.0, float(timings.get(s, 0.0))) for s in STAGES}
        total = sum(seconds.values())
        if total <= 0:
            return
        for stage in STAGES:
            self.shares[stage] = (1 - self.alpha) * self.shares[stage] + self.alpha * seconds[stage] / total


class GenerationProgress:
    """Turns stage progress events into the progress a job record shows.

    Args:
        shares: stage shares (`StageShares.shares`), read when the generation starts.
        clock: monotonic clock (injectable for tests).
    """

    def __init__(self, shares: dict[str, float], clock: Callable[[], float] = time.monotonic) -> None:
        total = sum(shares.get(s, 0.0) for s in STAGES) or 1.0
        self._shares = {s: shares.get(s, 0.0) / total for s in STAGES}
        self._clock = clock
        self._started = clock()
        self._fraction = 0.0

    def _at(self, stage: str, within: float) -> float:
        done = sum(self._shares[s] for s in STAGES[: STAGES.index(stage)])
        return done + self._shares[stage] * min(1.0, max(0.0, within))

    def update(self, stage: str, event: dict[str, Any] | None = None) -> dict[str, Any]:
        """The job's progress after `event` of `stage` (None: the stage just started).

        Args:
            stage: ``text_encode``, ``denoise`` or ``decode``.
            event: the denoiser's ``{"step", "steps", "window", "windows"}`` (1-based) or the
                decoder's ``{"phase": "vae_decode" | "encode", "fraction"}``.

        Returns:
            ``{"stage", "fraction", "eta_s", ...the event's fields}``; ``fraction`` never
            goes back, ``eta_s`` is None until there is something to extrapolate from.
        """
        event = dict(event or {})
        if stage == "denoise" and event.get("steps"):
            units = event["steps"] * event["windows"]
            done = (event["step"] - 1) * event["windows"] + event["window"]
            fraction = self._at("denoise", done / units)
        elif stage == "decode" and event.get("phase") in ("vae_decode", "encode"):
            fraction = self._at(event["phase"], event.get("fraction", 0.0))
        elif stage == "decode":
            fraction = self._at("vae_decode", 0.0)
        else:
            fraction = self._at(stage if stage in self._shares else "text_encode", 0.0)
        self._fraction = max(self._fraction, fraction)
        return {"stage": stage, **event, "fraction": round(self._fraction, 4), "eta_s": self.eta_s()}

    def eta_s(self) -> float | None:
        """Seconds left, extrapolated from the time so far and the overall fraction."""
        if self._fraction <= 0.0:
            return None
        elapsed = self._clock() - self._started
        return round(elapsed * (1.0 - self._fraction) / self._fraction, 1)

    def finished(self) -> dict[str, Any]:
        """The progress of a generation that completed."""
        self._fraction = 1.0
        return {"stage": None, "fraction": 1.0, "eta_s": 0.0}
