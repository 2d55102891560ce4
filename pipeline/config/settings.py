"""Infrastructure settings from the environment (one cached object, FastAPI style).

Tenant behaviour lives in the tenant YAML (`pipeline.config.tenant`); this module only knows
*where* things are: artifact root, Redis, MLflow, tenant configs.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _default_concurrency() -> int:
    """Requests one worker runs at once: enough to keep its CPUs busy while some wait on Redis."""
    return 4 * (os.cpu_count() or 1)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RECSYS_", extra="ignore", frozen=True)

    home: Path = Field(default=PROJECT_ROOT / "var", description="Local state: artifacts, MLflow, caches.")
    artifact_root: str = Field(default="", description="A folder or s3://bucket/prefix. Default: {home}/artifacts.")
    data_root: Path = Field(default=PROJECT_ROOT, description="Base for relative tenant source paths.")
    tenants_dir: Path = Field(default=PROJECT_ROOT / "include" / "tenants")
    expectations_dir: Path | None = Field(
        default=None,
        description="Validation suite files (_default.yaml, {tenant}.yaml). Default: expectations/ beside tenants_dir.",
    )
    redis_url: str | None = Field(default=None, description="Unset: the embedded store (release files).")
    redis_prefix: str = "recsys"
    redis_grace_seconds: int = Field(default=86_400, ge=0, description="How long a replaced release stays in Redis.")
    lease_ttl_seconds: float = Field(
        default=600,
        gt=0,
        description="A run's lease (pipeline/storage/lease.py) expires after this long without a heartbeat "
        "(renewed every ttl/4 while a stage runs); then another copy of the interval may take over.",
    )
    mlflow_tracking_uri: str = Field(
        default="",
        validation_alias="MLFLOW_TRACKING_URI",
        description="Default: sqlite under {home} (MLflow 3 refuses the plain file store).",
    )
    auth_disabled: bool = Field(default=False, description="RECSYS_AUTH_DISABLED=1: no API keys (local demos only).")
    api_keys_file: Path | None = Field(default=None, description="YAML {tenant: [sha256 hex of each key]}.")

    @field_validator("api_keys_file", "expectations_dir", mode="before")
    @classmethod
    def _empty_path(cls, value: object) -> object:
        return None if value == "" else value

    release_poll_seconds: float = Field(default=2.0, ge=0, description="How often serving re-reads pointers.")
    alert_webhook_url: str | None = Field(default=None, description="POSTed a JSON message when a task fails.")
    cors_origins: str = Field(
        default="", description="Comma-separated origins allowed to call the API from a browser ('*': any)."
    )
    rate_limit: str = Field(
        default="1000/second",
        description="Default per-tenant request limit, in `limits` notation ('100/second;5000/minute'); "
        "'' disables. Shared through Redis when RECSYS_REDIS_URL is set, else per process.",
    )
    fold_in_cache_users: int = Field(
        default=100_000, ge=0, description="Users whose folded-in vectors one process keeps without Redis."
    )
    # Serving's fault budget (pipeline/serving/breaker.py, loader.py): stages keep their long timeouts.
    redis_timeout_ms: int = Field(
        default=50, ge=1, description="Serving's Redis connect and read timeout (no retry): a slow Redis degrades."
    )
    s3_connect_timeout_s: float = Field(default=2.0, gt=0, description="Serving's S3 connect timeout.")
    s3_read_timeout_s: float = Field(default=5.0, gt=0, description="Serving's S3 read timeout.")
    s3_max_attempts: int = Field(default=2, ge=1, description="Serving's S3 attempts per call (botocore retries).")
    breaker_failures: int = Field(default=5, ge=1, description="Consecutive failures that open a breaker.")
    breaker_reset_seconds: float = Field(default=5.0, gt=0, description="How long a breaker stays open.")
    release_retry_seconds: float = Field(
        default=600.0, ge=0, description="How long a release that failed to load is not tried again."
    )
    cold_wait_seconds: float = Field(
        default=5.0, ge=0, description="How long a request waits for its tenant's first load before a 503."
    )
    serving_tenants: str = Field(
        default="", description="Tenants to preload and wait for in /readyz: a comma list, or '*' (every tenant YAML)."
    )
    ready_timeout_s: float = Field(
        default=120.0, ge=0, description="After this, /readyz is 200 ('partial') with whatever loaded."
    )
    admin_token: str | None = Field(
        default=None, description="Bearer token for /metrics and the tenant list of /readyz; unset: metrics open."
    )
    # The impression log of experiments (pipeline/serving/impressions.py), per worker.
    impressions_buffer: int = Field(
        default=50_000, ge=1, description="Impressions held in memory at most (storage slow or down); beyond: dropped."
    )
    impressions_batch: int = Field(default=2_000, ge=1, description="Impressions per Parquet object written.")
    impressions_flush_seconds: float = Field(default=5.0, gt=0, description="Longest wait before a partial batch.")
    # Bounded input and admission control (pipeline/serving/limits.py, admission.py), per worker.
    max_body_bytes: int = Field(default=1_000_000, ge=1, description="Larger request bodies get 413, unread.")
    max_concurrency: int = Field(
        default=_default_concurrency(),
        ge=0,
        description="Requests inside one worker at once (default 4 per CPU); beyond it plus the queue: 503. 0: off.",
    )
    admission_queue: int = Field(
        default=8 * _default_concurrency(),
        ge=0,
        description="Requests waiting for admission at most (default 32 per CPU).",
    )
    admission_wait_ms: float = Field(
        default=100.0,
        ge=0,
        description="Longest wait in that queue before a 503, in a burst (the queue emptied lately).",
    )
    admission_overload_wait_ms: float = Field(
        default=5.0, ge=0, description="Longest wait once the queue has not emptied for a whole interval (overload)."
    )
    admission_max_loop_lag_ms: float = Field(
        default=25.0,
        ge=0,
        description="Event-loop lag that, on every tick for admission_loop_lag_interval_ms, sheds new requests "
        "(the CPU is saturated). 0: off.",
    )
    admission_loop_lag_interval_ms: float = Field(
        default=250.0, gt=0, description="How long the loop must stay late to count as saturated."
    )
    admission_interval_ms: float = Field(
        default=100.0, gt=0, description="How long a queue must stay non-empty to count as overload (controlled delay)."
    )
    retry_after_seconds: int = Field(default=1, ge=1, description="Retry-After of a 503 from admission control.")
    tenant_work_limit: str = Field(
        default="200000/second",
        description="Per-tenant work budget of one worker in units of users x candidates ('limits' notation: "
        "a single k=10 request costs 10, a batch of 1,000 users x k=100 costs 100,000); '' disables.",
    )

    @model_validator(mode="after")
    def _defaults(self) -> Settings:
        # frozen model: fill derived defaults through object.__setattr__ once, at construction.
        if not self.artifact_root:
            object.__setattr__(self, "artifact_root", str(self.home / "artifacts"))
        if self.expectations_dir is None:
            object.__setattr__(self, "expectations_dir", self.tenants_dir.parent / "expectations")
        if not self.mlflow_tracking_uri:
            object.__setattr__(self, "mlflow_tracking_uri", f"sqlite:///{self.home / 'mlflow.db'}")
        for name in ("redis_url", "alert_webhook_url", "admin_token"):  # docker-compose passes unset vars as ""
            if getattr(self, name) == "":
                object.__setattr__(self, name, None)
        return self


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
