"""Tenant configuration: `include/tenants/{tenant}.yaml`, checked by pydantic.

Every field has a default that gives good quality, so a tenant file can be as small as its id
and source. Errors name the file, the field and the reason (`TenantConfigError`).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

TENANT_ID_PATTERN = r"^[a-z0-9][a-z0-9-]{0,39}$"
_TENANT_RE = re.compile(TENANT_ID_PATTERN)


class TenantConfigError(ValueError):
    """An invalid tenant file; the message names the file, the field(s) and the reason(s)."""


def is_valid_tenant_id(value: str) -> bool:
    return bool(_TENANT_RE.fullmatch(value))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ColumnMap(_Strict):
    """Source column names for each canonical field."""

    user_id: str = "user_id"
    item_id: str = "item_id"
    timestamp: str = "timestamp"
    rating: str | None = None


class SourceConfig(_Strict):
    uri: str = Field(description="A .csv/.parquet file or a folder of them; relative paths are under RECSYS_DATA_ROOT.")
    format: Literal["auto", "csv", "parquet"] = "auto"
    columns: ColumnMap = ColumnMap()
    delimiter: str = Field(default=",", min_length=1, max_length=1)
    timestamp_unit: Literal["s", "ms", "us", "ns"] = Field(
        default="s", description="Unit of numeric timestamps; strings are parsed as ISO 8601."
    )


class CatalogColumns(_Strict):
    """Source column names of the item catalog; attributes are optional."""

    item_id: str = "item_id"
    category: str | None = Field(default=None, description="One category per item (filters, max-per-category).")
    tags: str | None = Field(default=None, description="Tags in one cell, split on tags_separator.")
    title: str | None = None


class CatalogConfig(_Strict):
    """Item attributes (optional): serving filters and diversifies on category and tags."""

    uri: str = Field(description="A .csv/.parquet file or a folder of them; relative paths are under RECSYS_DATA_ROOT.")
    format: Literal["auto", "csv", "parquet"] = "auto"
    columns: CatalogColumns = CatalogColumns()
    delimiter: str = Field(default=",", min_length=1, max_length=1)
    tags_separator: str = Field(default="|", min_length=1)


class ValidationConfig(_Strict):
    min_rows: int = Field(default=100, ge=1)
    min_timestamp: datetime = datetime(1990, 1, 1, tzinfo=UTC)
    max_duplicate_fraction: float = Field(default=0.01, ge=0, le=1, description="(user,item,timestamp) repeats.")
    rating_range: tuple[float, float] | None = None


class FeaturesConfig(_Strict):
    holdout_fraction: float = Field(default=0.2, gt=0, lt=1, description="Last share of each user's events.")
    min_users: int = Field(default=10, ge=2)
    min_items: int = Field(default=10, ge=2)


class ALSConfig(_Strict):
    """Implicit ALS with recency-graded targets, ALS-WR regularisation and a recency fold-in.

    Defaults were tuned on MovieLens-100K (per-user temporal 80/20 split) against a
    validation split carved from the training events; see pipeline/models/als.py.
    """

    kind: Literal["als"] = "als"
    factors: int = Field(default=64, ge=1, le=1024)
    iterations: int = Field(default=10, ge=1, le=200)
    regularization: float = Field(default=0.1, ge=0, description="lambda; scaled by n ** reg_exponent per row.")
    reg_exponent: float = Field(default=1.0, ge=0, le=2, description="1 = ALS-WR (lambda * n_u), 0 = plain lambda.")
    alpha: float = Field(default=1.0, ge=0, description="Confidence = 1 + alpha * log2(1 + events of the pair).")
    recency_half_life: float | None = Field(
        default=50.0, gt=0, description="Target halves per this many newer events of the user (None: all 1)."
    )
    recency_floor: float = Field(default=0.1, ge=0, le=1)
    fold_in_half_life: float | None = Field(
        default=5.0, gt=0, description="After training, re-solve users with this sharper recency (None: skip)."
    )
    fold_in_floor: float = Field(default=0.05, ge=0, le=1)
    fold_in_regularization: float = Field(default=0.3, ge=0)
    init_std: float = Field(default=0.1, gt=0, description="Initial factors ~ N(0, (init_std / sqrt(factors))^2).")
    seed: int = 42


# One kind today; more kinds become a union discriminated on `kind` (defaulting to "als").
ModelConfig = ALSConfig


class EvaluationConfig(_Strict):
    k: int = Field(default=10, ge=1, le=100)


class GateConfig(_Strict):
    metric: Literal["ndcg", "recall", "map", "precision", "hit_rate"] = "ndcg"
    tolerance: float = Field(default=0.01, ge=0, description="Absolute drop allowed vs the live release.")
    min_users: int = Field(default=50, ge=1, description="Fewer comparable users: champion check inconclusive.")
    require_beat_popularity: bool = True


# Celery/Kubernetes queue per model family: CPU workers take the matrix factorisations, GPU
# workers the neural models. LocalExecutor ignores queues.
MODEL_QUEUES = {"popularity": "cpu", "als": "cpu", "bpr": "cpu", "two_tower": "gpu", "graphsage": "gpu"}


class TrainingConfig(_Strict):
    """Where training tasks run: an Airflow pool and a queue per model family (GPU workers)."""

    pool: str = "training"
    queue: str | None = Field(default=None, description="Celery/K8s queue; default by model family (cpu/gpu).")

    def queue_for(self, kind: str) -> str:
        return self.queue or MODEL_QUEUES.get(kind, "cpu")


class RetentionConfig(_Strict):
    runs: int = Field(default=14, ge=1, description="Newest run folders kept; older ones are deleted.")
    releases: int = Field(default=10, ge=2, description="Newest releases kept (the live one always is).")


class ExportConfig(_Strict):
    k: int = Field(default=20, ge=1, le=1000, description="Items per user in the batch export of each release.")


class ServingConfig(_Strict):
    popular_items: int = Field(default=200, ge=1, le=10_000, description="Fallback list length kept per release.")


class IndexConfig(_Strict):
    """The FAISS index of a release: exact while that is cheap, else an ANN index whose
    recall@10 against exact search is measured at build time and must reach `min_recall`."""

    kind: Literal["auto", "flat", "hnsw", "ivf"] = Field(
        default="auto",
        description="auto: exact (flat) up to exact_max_items items, IVF above (faster than HNSW at equal recall).",
    )
    exact_max_items: int = Field(
        default=50_000, ge=1, description="auto stays exact up to here: a flat scan of 50k x 64 is ~1 ms per query."
    )
    min_recall: float = Field(
        default=0.95, gt=0, le=1, description="Build fails below this recall@10 vs exact, after tuning the search."
    )
    hnsw_m: int = Field(default=32, ge=4, le=256, description="Graph degree: higher = better recall, more memory.")
    hnsw_ef_construction: int = Field(default=200, ge=8, description="Build-time beam: better graph, slower build.")
    hnsw_ef_search: int = Field(
        default=64, ge=1, description="Starting search beam; doubled at build time until min_recall is met."
    )
    ivf_nlist: int | None = Field(
        default=None, ge=1, description="IVF clusters; None: ~4*sqrt(items), capped so each has >= 39 points."
    )
    ivf_nprobe: int = Field(default=16, ge=1, description="Starting clusters probed; doubled until min_recall.")
    recall_probes: int = Field(
        default=1000, ge=10, description="Item (and as many user) vectors used as recall queries at build time."
    )
    seed: int = Field(default=0, description="IVF clustering and probe sampling seed: same input, same index.")


class TenantConfig(_Strict):
    tenant: str = Field(pattern=TENANT_ID_PATTERN)
    schedule: str = Field(default="0 2 * * *", description="Cron for the nightly retrain (UTC).")
    start_date: datetime = Field(
        default=datetime(2020, 1, 1, tzinfo=UTC), description="Earliest data interval a backfill may cover."
    )
    source: SourceConfig
    catalog: CatalogConfig | None = None
    validation: ValidationConfig = ValidationConfig()
    features: FeaturesConfig = FeaturesConfig()
    model: ModelConfig = ALSConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    gate: GateConfig = GateConfig()
    serving: ServingConfig = ServingConfig()
    index: IndexConfig = IndexConfig()
    training: TrainingConfig = TrainingConfig()
    retention: RetentionConfig = RetentionConfig()
    export: ExportConfig = ExportConfig()

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str) -> str:
        if len(value.split()) != 5 and not value.startswith("@"):
            raise ValueError(f"not a 5-field cron expression or @preset: {value!r}")
        return value


def _format_errors(path: Path, err: ValidationError) -> str:
    lines = [f"invalid tenant config {path}:"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(file)"
        lines.append(f"  field {field!r}: {e['msg']}")
    return "\n".join(lines)


def load_tenant_file(path: str | Path, *, expect_name_match: bool = False) -> TenantConfig:
    """Read and validate one tenant YAML; raise TenantConfigError naming file, field, reason."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TenantConfigError(f"tenant config {path}: file not found") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise TenantConfigError(f"tenant config {path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise TenantConfigError(f"tenant config {path}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        cfg = TenantConfig.model_validate(raw)
    except ValidationError as exc:
        raise TenantConfigError(_format_errors(path, exc)) from None
    if expect_name_match and path.stem != cfg.tenant:
        raise TenantConfigError(
            f"invalid tenant config {path}:\n"
            f"  field 'tenant': {cfg.tenant!r} does not match the file name {path.stem!r}"
        )
    return cfg


def tenant_files(tenants_dir: str | Path) -> list[Path]:
    return sorted(p for p in Path(tenants_dir).glob("*.yaml") if not p.name.startswith("_"))


def load_tenant(tenant: str, tenants_dir: str | Path) -> TenantConfig:
    if not is_valid_tenant_id(tenant):
        raise TenantConfigError(f"tenant id {tenant!r} is invalid: must match {TENANT_ID_PATTERN}")
    return load_tenant_file(Path(tenants_dir) / f"{tenant}.yaml", expect_name_match=True)
