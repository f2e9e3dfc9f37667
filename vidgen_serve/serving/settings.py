"""Serving settings: the `args` of the Ray Serve application, validated once by the builder."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..config import AppConfig
from .failover import FailoverSettings


class ServeSettings(BaseModel):
    """Everything `build_app(args)` accepts (the `args:` block of `serve_config.yaml`)."""

    model_config = ConfigDict(extra="forbid")

    model: AppConfig = Field(default_factory=AppConfig, description="Model profile, styles and cache dir.")
    state_dir: Path = Field(
        Path("var"), description="Where the job database and artifacts live unless set separately."
    )
    job_store: str | None = Field(
        None, description="Where job records live: None = SQLite at <state_dir>/jobs.sqlite3 (one node); "
        "'sqlite:///path'; 'redis://host:port/db' or 'rediss://...' (a cluster: every ingress replica shares it).",
    )
    job_store_namespace: str = Field(
        "vidgen", pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="Key prefix of this application's jobs in Redis (applications sharing one Redis differ here).",
    )
    artifact_store: str | None = Field(
        None, description="Where finished MP4s live: None = <state_dir>/artifacts; 'file:///dir'; "
        "'s3://bucket/prefix' (credentials from the standard AWS environment / credential chain).",
    )
    s3_endpoint_url: str | None = Field(
        None, description="Endpoint of an S3-compatible store (MinIO, Ceph, R2...); None = AWS S3.")
    s3_region: str | None = Field(None, description="S3 region; None = the AWS chain's default.")
    artifact_redirect: bool = Field(
        False, description="GET .../content answers 307 to a presigned URL of the store (S3) instead of streaming.")
    artifact_url_ttl_s: int = Field(900, ge=10, le=7 * 24 * 3600, description="Lifetime of a presigned URL.")
    max_body_bytes: int = Field(64 * 1024, ge=1024, description="Largest request body accepted (413 beyond).")
    max_batch_size: int = Field(16, ge=1, le=256, description="Most requests in one POST /v1/video/batch.")
    max_inflight_sync: int = Field(
        4, ge=1, description="Synchronous generations one ingress replica runs at once (429 beyond)."
    )
    max_running_jobs: int = Field(
        2, ge=0, description="Async jobs one ingress replica runs at once (0: this replica only accepts jobs).")
    max_queued_jobs: int = Field(
        64, ge=0, description="Async jobs waiting in the job store, all ingress replicas together (429 beyond)."
    )
    request_timeout_s: float = Field(
        600.0, gt=0, description="Deadline of one generation (504 beyond; its work is cancelled downstream)."
    )
    retry_after_s: int = Field(5, ge=1, description="Retry-After seconds sent with 429/503.")
    stage_nice: int = Field(
        10, ge=0, le=19,
        description="CPU niceness the stage replicas (TextEncoder, Denoiser, Decoder) add to their own process "
        "(every thread, and the ffmpeg they start), so that on a node whose cores they share, Serve's HTTP proxy "
        "and the ingress are scheduled first: 429s, health checks and job polls stay fast while generations "
        "saturate the CPU. Only matters under CPU contention (idle cores are used as before); 0 = unchanged.",
    )
    job_heartbeat_s: float = Field(5.0, gt=0, description="How often a replica marks its running jobs alive.")
    job_stale_after_s: float = Field(
        30.0, gt=0, description="A running job whose owner has not been heard of this long is recovered."
    )
    max_job_attempts: int = Field(
        2, ge=1, description="Runs a job gets when its owner dies mid-run (resumed from its plan, then failed)."
    )
    max_styles_per_replica: int = Field(
        4, ge=1, le=64,
        description="Style LoRA adapters one denoiser replica keeps loaded (Serve model multiplexing; the least "
        "recently used is unloaded beyond it).",
    )
    failover: FailoverSettings = Field(default_factory=FailoverSettings, description="Latency failover policy.")
    standby: bool = Field(True, description="Deploy a standby denoiser and route through the failover router.")
    probe_request: dict = Field(
        default_factory=lambda: {"prompt": "canary", "duration": 1, "resolution": "480p", "num_inference_steps": 2,
                                 "seed": 0},
        description="Request the router probes an idle denoiser with (make it typical of your traffic: latency "
        "is compared per unit of work, and tiny requests carry relatively more fixed overhead).",
    )

    @field_validator("job_store")
    @classmethod
    def _job_store_url(cls, value: str | None) -> str | None:
        from ..state.jobs import parse_job_store_url

        parse_job_store_url(value, Path("var"))  # a malformed URL fails here, naming the field
        return value

    @field_validator("artifact_store")
    @classmethod
    def _artifact_store_url(cls, value: str | None) -> str | None:
        from ..state.artifacts import parse_artifact_store_url

        parse_artifact_store_url(value, Path("var"))
        return value

    def open_job_store(self):
        """The configured job store (not yet started)."""
        from ..state.jobs import open_job_store

        return open_job_store(self.job_store, self.state_dir, namespace=self.job_store_namespace)

    def open_artifact_store(self):
        """The configured artifact store (not yet started)."""
        from ..state.artifacts import open_artifact_store

        return open_artifact_store(self.artifact_store, self.state_dir, s3_endpoint_url=self.s3_endpoint_url,
                                   s3_region=self.s3_region)
