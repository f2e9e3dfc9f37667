"""vidgen-serve: production serving for text-to-video diffusion models (Wan 2.1) on Ray Serve."""

__version__ = "0.1.0"
