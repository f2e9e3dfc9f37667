"""Serving settings: the `args` of the Ray Serve application, validated once by the builder."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from ..config import AppConfig
from .failover import FailoverSettings


class ServeSettings(BaseModel):
    """Everything `build_app(args)` accepts (the `args:` block of `serve_config.yaml`)."""

    model_config = ConfigDict(extra="forbid")

    model: AppConfig = Field(default_factory=AppConfig, description="Model profile, styles and cache dir.")
    state_dir: Path = Field(
        Path("var"), description="Where the job database and artifacts live unless set separately."
    )
    jobs_db: Path | None = Field(None, description="SQLite job database path (default: <state_dir>/jobs.sqlite3).")
    artifacts_dir: Path | None = Field(None, description="Directory of finished MP4s (default: <state_dir>/artifacts).")
    max_body_bytes: int = Field(64 * 1024, ge=1024, description="Largest request body accepted (413 beyond).")
    max_batch_size: int = Field(16, ge=1, le=256, description="Most requests in one POST /v1/video/batch.")
    max_inflight_sync: int = Field(
        4, ge=1, description="Synchronous generations one ingress replica runs at once (429 beyond)."
    )
    max_running_jobs: int = Field(2, ge=1, description="Async jobs one ingress replica runs at once.")
    max_queued_jobs: int = Field(
        64, ge=0, description="Async jobs waiting in the job store, all ingress replicas together (429 beyond)."
    )
    request_timeout_s: float = Field(
        600.0, gt=0, description="Deadline of one generation (504 beyond; its work is cancelled downstream)."
    )
    retry_after_s: int = Field(5, ge=1, description="Retry-After seconds sent with 429/503.")
    job_heartbeat_s: float = Field(5.0, gt=0, description="How often a replica marks its running jobs alive.")
    job_stale_after_s: float = Field(
        30.0, gt=0, description="A running job whose owner has not been heard of this long is recovered."
    )
    max_job_attempts: int = Field(
        2, ge=1, description="Runs a job gets when its owner dies mid-run (resumed from its plan, then failed)."
    )
    failover: FailoverSettings = Field(default_factory=FailoverSettings, description="Latency failover policy.")
    standby: bool = Field(True, description="Deploy a standby denoiser and route through the failover router.")
    probe_request: dict = Field(
        default_factory=lambda: {"prompt": "canary", "duration": 1, "resolution": "480p", "num_inference_steps": 2,
                                 "seed": 0},
        description="Request the router probes an idle denoiser with (make it typical of your traffic: latency "
        "is compared per unit of work, and tiny requests carry relatively more fixed overhead).",
    )

    @property
    def jobs_db_path(self) -> Path:
        return self.jobs_db or self.state_dir / "jobs.sqlite3"

    @property
    def artifacts_path(self) -> Path:
        return self.artifacts_dir or self.state_dir / "artifacts"
