"""A parallel denoiser on a private local Ray cluster, for the CLI's ``--parallel`` / ``--tp N``.

:class:`LocalParallelDenoiser` starts a local Ray instance (unless this process is already
connected to one), then a :class:`~vidgen_serve.parallel.group.ParallelDenoiser` in a
placement group of its own; :meth:`close` removes both.

Ray 2.60 turns token authentication on by default for a new local cluster and, when no token is
configured, writes a generated one to ``~/.ray/auth_token``.  A private, short-lived cluster needs
no persistent token (and ``$HOME`` may be read-only), so when neither ``RAY_AUTH_MODE``,
``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` nor ``~/.ray/auth_token`` is set, an ephemeral token
is put in this process's environment: the cluster keeps token auth on and its processes inherit
the token.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

from ..config import AppConfig
from .group import ParallelDenoiser, validate_layout

__all__ = ["LocalParallelDenoiser", "LocalTensorParallelDenoiser", "prepare_local_ray_env"]


def prepare_local_ray_env() -> None:
    """Environment for a private local Ray cluster: no usage stats, token auth without a file."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    if (Path.home() / ".ray" / "auth_token").is_file():
        return
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)


class LocalParallelDenoiser:
    """``ParallelDenoiser`` of ``config``'s ``parallel`` layout on a local Ray.

    Same interface as ``Denoiser`` (``start``/``denoise``) plus ``check_health``,
    ``parameter_bytes`` and ``close`` (shuts the group down, then the Ray instance if it
    started it).
    """

    def __init__(self, config: AppConfig, checkpoint: str | None = None, **group_kwargs: Any):
        ranks = validate_layout(config.model_profile).size  # before Ray or any worker starts
        import ray

        self._owns_ray = False
        if not ray.is_initialized():
            prepare_local_ray_env()
            ray.init(
                address="local",  # a private cluster even where RAY_ADDRESS points elsewhere
                num_cpus=max(2, ranks + 1),
                include_dashboard=False,
                log_to_driver=False,
                ignore_reinit_error=True,
                logging_level="ERROR",
            )
            self._owns_ray = True
        try:
            self.group = ParallelDenoiser(config, checkpoint, **group_kwargs)
        except BaseException:
            if self._owns_ray:
                ray.shutdown()
                self._owns_ray = False
            raise
        self.config = config
        self.profile = self.group.profile
        self.device = self.group.device
        self._closed = False

    @property
    def world_size(self) -> int:
        """Ranks in the group."""
        return self.group.world_size

    def start(self, plan, embeddings):
        return self.group.start(plan, embeddings)

    def denoise(self, plan, embeddings, progress=None, should_cancel=None):
        return self.group.denoise(plan, embeddings, progress=progress, should_cancel=should_cancel)

    def parameter_bytes(self) -> list[int]:
        return self.group.parameter_bytes()

    def check_health(self) -> None:
        self.group.check_health()

    def close(self) -> None:
        """Shut the group down, then the local Ray instance (if started here). Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.group.close()
        finally:
            if self._owns_ray:
                import ray

                ray.shutdown()
                self._owns_ray = False

    def __enter__(self) -> "LocalParallelDenoiser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


#: The name from before the group carried Ulysses and CFG layouts.
LocalTensorParallelDenoiser = LocalParallelDenoiser
