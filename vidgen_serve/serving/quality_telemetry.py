"""Prometheus histograms of the per-video quality metrics (`media.quality`), recorded by the
Decoder replica that computed them (Ray Serve's metrics API, exported like `telemetry`'s)."""

from __future__ import annotations

# Boundaries: SSIM and the flicker score live in 0..1 and matter most near 1; PSNR in dB.
_UNIT_BOUNDARIES = [0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999]
_PSNR_BOUNDARIES = [10, 15, 20, 25, 28, 30, 32, 35, 40, 45, 50, 60, 80, 99.9]

HISTOGRAMS = {
    "temporal_ssim": ("vidgen_video_temporal_ssim",
                      "Mean SSIM between consecutive frames of a generated video.", _UNIT_BOUNDARIES),
    "temporal_psnr_db": ("vidgen_video_temporal_psnr_db",
                         "Mean PSNR (dB, 100 = identical) between consecutive frames of a generated video.",
                         _PSNR_BOUNDARIES),
    "flicker": ("vidgen_video_flicker_score",
                "VBench temporal-flickering score of a generated video (1 = no change between frames).",
                _UNIT_BOUNDARIES),
}


class QualityHistograms:
    """One histogram per metric (`vidgen_video_temporal_ssim`, `vidgen_video_temporal_psnr_db`,
    `vidgen_video_flicker_score`), tagged with the model profile."""

    def __init__(self, profile: str):
        from ray.serve import metrics

        self.tags = {"profile": profile}
        self.histograms = {
            metric: metrics.Histogram(name, description=description, boundaries=boundaries, tag_keys=("profile",))
            for metric, (name, description, boundaries) in HISTOGRAMS.items()
        }

    def observe(self, quality: dict[str, float]) -> None:
        for metric, value in quality.items():
            histogram = self.histograms.get(metric)
            if histogram is not None:
                histogram.observe(value, tags=self.tags)
