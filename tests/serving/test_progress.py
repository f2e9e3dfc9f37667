"""A job's overall progress: one fraction that only moves forward, and an ETA."""

from __future__ import annotations

import pytest

from vidgen_serve.serving.progress import DEFAULT_SHARES, GenerationProgress, StageShares

SHARES = {"text_encode": 0.1, "denoise": 0.5, "vae_decode": 0.2, "encode": 0.2}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_denoise_windows_do_not_move_the_fraction_back():
    progress = GenerationProgress(SHARES, clock=Clock())
    fractions = []
    for step in (1, 2):
        for window in (1, 2):  # the raw (step, window) pairs go 1/1, 1/2, 2/1, 2/2
            p = progress.update("denoise", {"step": step, "steps": 2, "window": window, "windows": 2})
            assert (p["step"], p["window"]) == (step, window)  # the stage's own event is kept
            fractions.append(p["fraction"])
    assert fractions == pytest.approx([0.1 + 0.5 * k / 4 for k in (1, 2, 3, 4)])


def test_decode_phases_and_eta():
    clock = Clock()
    progress = GenerationProgress(SHARES, clock=clock)
    assert progress.update("text_encode")["eta_s"] is None  # nothing to extrapolate from yet
    progress.update("denoise", {"step": 1, "steps": 1, "window": 1, "windows": 1})
    clock.now += 6.0  # 6 s for 60% of the work
    p = progress.update("decode")
    assert p["fraction"] == pytest.approx(0.6) and p["eta_s"] == pytest.approx(4.0)
    p = progress.update("decode", {"phase": "vae_decode", "fraction": 0.5})
    assert p["phase"] == "vae_decode" and p["fraction"] == pytest.approx(0.7)
    p = progress.update("decode", {"phase": "encode", "fraction": 0.0})
    assert p["fraction"] == pytest.approx(0.8)
    assert progress.update("decode", {"phase": "vae_decode", "fraction": 0.1})["fraction"] == pytest.approx(0.8)
    assert progress.finished() == {"stage": None, "fraction": 1.0, "eta_s": 0.0}


def test_shares_follow_finished_generations():
    shares = StageShares(alpha=0.5)
    assert shares.shares == DEFAULT_SHARES
    shares.observe({"text_encode": 0.0, "denoise": 1.0, "vae_decode": 1.0, "encode": 2.0, "total": 4.2})
    assert shares.shares["encode"] == pytest.approx(0.5 * DEFAULT_SHARES["encode"] + 0.5 * 0.5)
    assert sum(shares.shares.values()) == pytest.approx(1.0)
    shares.observe({})  # nothing measured: nothing learned
    assert sum(shares.shares.values()) == pytest.approx(1.0)
