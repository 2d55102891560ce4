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
from pydantic import Field, ValidationError, field_validator, model_validator

from pipeline.config import experiments as exp
from pipeline.config.engine import DataEngineConfig
from pipeline.config.models import MODEL_CONFIGS, MODEL_QUEUES, ALSConfig, ModelConfig, _Strict
from pipeline.config.twostage import TwoStageConfig

TENANT_ID_PATTERN = r"^[a-z0-9][a-z0-9-]{0,39}$"
_TENANT_RE = re.compile(TENANT_ID_PATTERN)


class TenantConfigError(ValueError):
    """An invalid tenant file; the message names the file, the field(s) and the reason(s)."""


def is_valid_tenant_id(value: str) -> bool:
    return bool(_TENANT_RE.fullmatch(value))


_URL_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_BIND = {name: re.compile(rf"(?<![:\w]):{name}\b") for name in ("start", "end")}
FileFormat = Literal["auto", "csv", "parquet", "jsonl"]


def is_sql_url(uri: str) -> bool:
    """A SQLAlchemy URL (`postgresql+psycopg://...`, `sqlite:///...`) rather than a path or s3://."""
    m = _URL_SCHEME.match(uri)
    return m is not None and m.group(1).split("+", 1)[0].lower() not in ("s3", "file", "http", "https")


def _check_sql(uri: str, query: str | None, need_binds: bool) -> None:
    if query is not None and not is_sql_url(uri):
        raise ValueError("query is only for SQL sources: uri must be a SQLAlchemy URL (postgresql+psycopg://...)")
    if is_sql_url(uri):
        if not query:
            raise ValueError(f"uri {uri.split('://', 1)[0]}://... is a database URL: give a query too")
        missing = [f":{n}" for n, rx in _BIND.items() if need_binds and not rx.search(query)]
        if missing:
            raise ValueError(f"query must bind the data interval with {' and '.join(missing)}")


class ColumnMap(_Strict):
    """Source column names for each canonical field."""

    user_id: str = "user_id"
    item_id: str = "item_id"
    timestamp: str = "timestamp"
    rating: str | None = None
    event_type: str | None = Field(default=None, description="Column naming the event type (view, click, ...).")


class SourceConfig(_Strict):
    uri: str = Field(
        description="A .csv/.parquet/.jsonl file (optionally .gz), a folder or s3:// prefix of them (Hive-style "
        "dt=YYYY-MM-DD/ partitions are read only for the days a run needs), or a SQLAlchemy URL with `query`; "
        "relative paths are under RECSYS_DATA_ROOT; ${VAR} in a URL is read from the environment."
    )
    format: FileFormat = "auto"
    query: str | None = Field(
        default=None, description="SQL sources: a query binding :start and :end (UTC) to the window a run reads."
    )
    columns: ColumnMap = ColumnMap()
    delimiter: str = Field(default=",", min_length=1, max_length=1)
    timestamp_unit: Literal["s", "ms", "us", "ns"] = Field(
        default="s", description="Unit of numeric timestamps; strings are parsed as ISO 8601."
    )
    partition_key: str = Field(
        default="dt", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="Hive partition folders: {key}=YYYY-MM-DD."
    )
    event_types: dict[str, float] = Field(
        default={},
        description="Confidence weight per event type ({view: 1, click: 2, purchase: 8}); empty: every event "
        "weighs 1. Matched case-insensitively; events without a type are 'interaction' (weight 1 unless listed).",
    )
    unknown_event_types: Literal["drop", "error"] = Field(
        default="drop", description="Event types not in event_types (when it is set): drop them, or fail the run."
    )
    rating_threshold: float | None = Field(
        default=None, description="Events with a rating below this are not positives and are left out of training."
    )
    lookback_days: int = Field(
        default=2, ge=0, le=366, description="Each run also rewrites this many earlier days (late events)."
    )

    @field_validator("event_types")
    @classmethod
    def _weights(cls, value: dict[str, float]) -> dict[str, float]:
        out = {}
        for name, weight in value.items():
            key = str(name).strip().lower()
            if not key:
                raise ValueError("event type names must not be empty")
            if key in out:
                raise ValueError(f"event type {key!r} is listed twice (names are case-insensitive)")
            if not weight >= 0 or weight == float("inf"):
                raise ValueError(f"weight of {key!r} must be a finite number >= 0 (0: ignore the type), got {weight}")
            out[key] = float(weight)
        return out

    @model_validator(mode="after")
    def _sql(self) -> SourceConfig:
        _check_sql(self.uri, self.query, need_binds=True)
        return self


class CatalogColumns(_Strict):
    """Source column names of the item catalog; attributes are optional."""

    item_id: str = "item_id"
    category: str | None = Field(default=None, description="One category per item (filters, max-per-category).")
    tags: str | None = Field(default=None, description="Tags in one cell, split on tags_separator.")
    title: str | None = None


class CatalogConfig(_Strict):
    """Item attributes (optional): serving filters and diversifies on category and tags."""

    uri: str = Field(description="A .csv/.parquet file or a folder of them; relative paths are under RECSYS_DATA_ROOT.")
    format: FileFormat = "auto"
    columns: CatalogColumns = CatalogColumns()
    delimiter: str = Field(default=",", min_length=1, max_length=1)
    tags_separator: str = Field(default="|", min_length=1)


class UserColumns(_Strict):
    user_id: str = "user_id"
    attributes: dict[str, str] | None = Field(
        default=None, description="Output name -> source column; None: every other column under its own name."
    )


class UsersConfig(_Strict):
    """User attributes (optional): stored per run as runs/{run}/extract/users.parquet, one row per user."""

    uri: str = Field(description="A file, folder or s3:// prefix like source.uri, or a SQLAlchemy URL with `query`.")
    format: FileFormat = "auto"
    query: str | None = Field(default=None, description="SQL: the attribute table's query (:end may be bound).")
    columns: UserColumns = UserColumns()
    delimiter: str = Field(default=",", min_length=1, max_length=1)

    @model_validator(mode="after")
    def _sql(self) -> UsersConfig:
        _check_sql(self.uri, self.query, need_binds=False)
        return self


class ValidationConfig(_Strict):
    """Shorthands for the validation suite; the full form (every check, its severity, the
    tenant's own GX expectations) is include/expectations/{tenant}.yaml, which wins over these
    (see pipeline/config/expectations.py and include/expectations/_default.yaml)."""

    min_rows: int = Field(default=100, ge=1, description="= row_count.min")
    min_timestamp: datetime = Field(default=datetime(1990, 1, 1, tzinfo=UTC), description="= old_timestamps.min")
    max_duplicate_fraction: float = Field(
        default=0.01,
        ge=0,
        le=1,
        description="= duplicates.max_fraction: interval events sharing (user, item, timestamp, event type).",
    )
    rating_range: tuple[float, float] | None = Field(default=None, description="= rating_range.min/max")


class FeaturesConfig(_Strict):
    holdout_fraction: float = Field(default=0.2, gt=0, lt=1, description="Last share of each user's events.")
    min_users: int = Field(default=10, ge=2)
    min_items: int = Field(default=10, ge=2)


class SelectionConfig(_Strict):
    """Model choice per tenant: candidates with fixed parameters or search ranges.

    A budgeted Optuna search runs on a validation split carved from the TRAIN events (the
    last `validation_fraction` of each user's train events), never on the holdout; the best
    configuration is then trained, evaluated, gated and refit like `model`.
    """

    candidates: list[ModelConfig] = Field(default=[], description="Empty: just `model`, no search.")
    trials: int = Field(default=12, ge=1, le=1000, description="Optuna trials per candidate that has search ranges.")
    timeout_seconds: float | None = Field(default=1800, gt=0, description="Budget per candidate's search.")
    validation_fraction: float = Field(default=0.1, gt=0, lt=1)
    metric: Literal["ndcg", "recall", "map", "precision", "hit_rate"] = "ndcg"
    seed: int = 0


class EvaluationConfig(_Strict):
    k: int = Field(default=10, ge=1, le=100)
    ease_max_items: int = Field(
        default=20_000, ge=0, description="EASE baseline only up to this many items (dense n^2 matrix, n^3 solve)."
    )
    knn_max_items: int = Field(
        default=100_000,
        ge=0,
        description="Item-kNN baseline only up to this many items (a dense block x n_items per ~80 items).",
    )
    max_users: int = Field(
        default=100_000,
        ge=1,
        description="Rank at most this many holdout users (the same ones every run: those of lowest user-id hash).",
    )


class GateConfig(_Strict):
    """Promotion policy; every check and its defaults are described in pipeline/gate/stage.py."""

    metric: Literal["ndcg", "recall", "map", "precision", "hit_rate"] = "ndcg"
    tolerance: float = Field(
        default=0.01, ge=0, description="Drop allowed vs the live release: the CI's lower bound must be >= -tolerance."
    )
    min_users: int = Field(default=50, ge=1, description="Fewer comparable users: champion check inconclusive.")
    require_beat_popularity: bool = True
    confidence: float = Field(default=0.95, gt=0.5, lt=1, description="Two-sided bootstrap confidence level.")
    bootstrap_resamples: int = Field(default=1000, ge=100, le=100_000)
    seed: int = Field(default=0, description="Bootstrap seed: the same evidence always gives the same decision.")
    min_coverage_ratio: float = Field(
        default=0.5, ge=0, le=1, description="Catalog coverage must stay >= this x the live release's."
    )
    min_coverage: float = Field(default=0.0, ge=0, le=1, description="Absolute coverage floor (0: none).")
    head_fraction: float = Field(
        default=0.2, gt=0, lt=1, description="Head = this share of items, most popular in train; the rest is long tail."
    )
    cold_item_max_users: int = Field(
        default=5, ge=1, description="Cold items: fewer than this many distinct users in the train split."
    )
    max_cold_recall_drop: float = Field(
        default=0.02, ge=0, le=1, description="Absolute drop allowed vs the live release."
    )
    max_long_tail_recall_drop: float = Field(
        default=0.02, ge=0, le=1, description="Absolute drop allowed vs the live release."
    )
    min_group_relevant: int = Field(
        default=30, ge=1, description="Fewer relevant pairs in a group: that guardrail is skipped (not enough data)."
    )


class TrainingConfig(_Strict):
    """Where training tasks run: an Airflow pool and a queue per model family (GPU workers)."""

    pool: str = "training"
    queue: str | None = Field(default=None, description="Celery/K8s queue; default by model family (cpu/gpu).")

    def queue_for(self, *kinds: str) -> str:
        """The configured queue, else `gpu` if any of the kinds is a GPU family, else `cpu`."""
        queues = {MODEL_QUEUES.get(k, "cpu") for k in kinds}
        return self.queue or ("gpu" if "gpu" in queues else "cpu")


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
        default=50_000, ge=1, description="auto stays exact up to here, where a flat scan is still cheap per query."
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
    users: UsersConfig | None = None
    validation: ValidationConfig = ValidationConfig()
    features: FeaturesConfig = FeaturesConfig()
    model: ModelConfig = ALSConfig()
    selection: SelectionConfig = SelectionConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    gate: GateConfig = GateConfig()
    serving: ServingConfig = ServingConfig()
    index: IndexConfig = IndexConfig()
    training: TrainingConfig = TrainingConfig()
    retention: RetentionConfig = RetentionConfig()
    export: ExportConfig = ExportConfig()
    data: DataEngineConfig = DataEngineConfig()
    two_stage: TwoStageConfig = TwoStageConfig()  # candidates from several sources + a learned ranker
    experiments: exp.Experiments = Field(default=[], description="Online experiments (pipeline/config/experiments.py).")
    challenger: exp.ChallengerConfig = exp.ChallengerConfig()

    @model_validator(mode="after")
    def _experiments(self) -> TenantConfig:
        exp.check(self.experiments, self.challenger)
        return self

    def live_experiments(self) -> list[exp.ExperimentConfig]:
        """The experiments serving runs: the configured ones plus the implicit challenger experiment."""
        return exp.effective(self.experiments, self.challenger)

    def model_kinds(self) -> list[str]:
        """Every kind this tenant may train: `model` and the selection candidates."""
        return sorted({self.model.kind, *(c.kind for c in self.selection.candidates)})

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str) -> str:
        if len(value.split()) != 5 and not value.startswith("@"):
            raise ValueError(f"not a 5-field cron expression or @preset: {value!r}")
        return value


def _format_errors(path: Path, err: ValidationError) -> str:
    lines = [f"invalid tenant config {path}:"]
    kinds = {c.model_fields["kind"].default for c in MODEL_CONFIGS}
    for e in err.errors():
        # a discriminated union puts the kind into the path (model.als.factors); the file says model.factors
        loc = [p for p in e["loc"] if p not in kinds]
        field = ".".join(str(p) for p in loc) or "(file)"
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
