"""Every artifact key comes from here, so a stage's outputs depend only on (tenant, run).

A run's files are declared once, as `Artifact`s: the stage that writes one and the file
name under that stage's folder. Stages name what they read and write with these constants
(each stage module's `IO`), never by building a key or naming another stage in a string;
`pipeline/stages.py` checks, as each stage runs, that it touches only what it declared.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

RUN_ID_FORMAT = "%Y%m%dT%H%M%SZ"


def run_id_of(interval_end: datetime) -> str:
    """The run id: the data interval's end, so every retry of an interval writes the same keys."""
    return interval_end.astimezone(UTC).strftime(RUN_ID_FORMAT)


def interval_end_of(run_id: str) -> datetime:
    return datetime.strptime(run_id, RUN_ID_FORMAT).replace(tzinfo=UTC)


def runs_prefix(tenant: str) -> str:
    return f"tenants/{tenant}/runs/"


def run_prefix(tenant: str, run_id: str) -> str:
    return f"tenants/{tenant}/runs/{run_id}"


def stage_key(tenant: str, run_id: str, stage: str, name: str) -> str:
    return f"{run_prefix(tenant, run_id)}/{stage}/{name}"


def run_of_key(tenant: str, key: str) -> str | None:
    """The run id a key of `runs/` belongs to (None for any other key)."""
    prefix = runs_prefix(tenant)
    return key[len(prefix) :].split("/", 1)[0] if key.startswith(prefix) else None


def run_ids(keys: Iterable[str], tenant: str) -> list[str]:
    """Sorted distinct run ids among keys listed under `runs_prefix(tenant)` (oldest first)."""
    return sorted({r for k in keys if (r := run_of_key(tenant, k))})


def runs_with(keys: Iterable[str], tenant: str, artifact: Artifact) -> list[str]:
    """Sorted run ids (oldest first) whose `artifact` is among `keys` (a listing of runs_prefix)."""
    suffix = f"/{artifact.stage}/{artifact.name}"
    return sorted({r for k in keys if k.endswith(suffix) and (r := run_of_key(tenant, k))})


def releases_prefix(tenant: str) -> str:
    return f"tenants/{tenant}/releases"


def release_prefix(tenant: str, release_id: str) -> str:
    return f"{releases_prefix(tenant)}/{release_id}"


def release_key(tenant: str, release_id: str, name: str) -> str:
    return f"{release_prefix(tenant, release_id)}/{name}"


def pointer_key(tenant: str) -> str:
    return f"tenants/{tenant}/current.json"


def pin_key(tenant: str) -> str:
    """Present while the tenant is pinned (rollback, pin): {release_id, pinned_at_interval_end, reason, by, ...}."""
    return f"tenants/{tenant}/pin.json"


def blocklist_key(tenant: str) -> str:
    """{"releases": {release_id: {reason, by, ...}}}: releases a publish may never make live again."""
    return f"tenants/{tenant}/blocklist.json"


def leases_prefix(tenant: str) -> str:
    return f"tenants/{tenant}/leases/"


def lease_key(tenant: str, run_id: str) -> str:
    """The run's lease (pipeline/storage/lease.py): outside `runs/` so listing runs never sees it."""
    return f"{leases_prefix(tenant)}{run_id}.json"


def events_prefix(tenant: str) -> str:
    return f"tenants/{tenant}/events"


def history_prefix(tenant: str) -> str:
    return f"tenants/{tenant}/history"


def export_key(tenant: str, release_id: str) -> str:
    """The top-k export of a release (pipeline/release/export.py)."""
    return f"tenants/{tenant}/exports/{release_id}/topk.parquet"


@dataclass(frozen=True)
class Artifact:
    """One file (or folder, `name` ending in '/') of a run, written by one stage."""

    stage: str
    name: str

    def key(self, tenant: str, run_id: str, sub: str = "") -> str:
        return stage_key(tenant, run_id, self.stage, self.name + sub)

    def __str__(self) -> str:
        return f"{self.stage}/{self.name}"


def result(stage: str) -> Artifact:
    """The small dict a stage returns (its XCom), kept beside its outputs."""
    return Artifact(stage, "result.json")


# The run's effective tenant configuration: written once when the run starts (its first
# stage), read by every later stage, so an edit of the tenant YAML mid-run cannot mix configs.
RUN_CONFIG = Artifact("run", "config.json")

INTERACTIONS = Artifact("extract", "interactions.parquet")  # every event before the interval end
CATALOG = Artifact("extract", "catalog.parquet")  # item attributes, when the tenant has a catalog
USER_ATTRIBUTES = Artifact("extract", "users.parquet")  # user attributes, when configured
EXTRACT_RESULT = result("extract")

VALIDATION_REPORT = Artifact("validate", "report.json")
DATA_DOCS = Artifact("validate", "data_docs/")
EXCLUDED_USERS = Artifact("validate", "excluded_users.parquet")  # users whose events training must not see

USERS = Artifact("features", "users.parquet")
ITEMS = Artifact("features", "items.parquet")
EVENTS = Artifact("features", "events.parquet")
ITEM_FEATURES = Artifact("features", "item_features.parquet")
USER_STATS = Artifact("features", "user_stats.parquet")
ITEM_STATS = Artifact("features", "item_stats.parquet")

SELECTED_CONFIG = Artifact("select", "model_config.json")  # the model configuration train and refit fit


@dataclass(frozen=True)
class ModelArtifacts:
    """A fitted model: safetensors weights plus the JSON that rebuilds it (kind, config)."""

    weights: Artifact
    meta: Artifact


TRAINED = ModelArtifacts(Artifact("train", "model.safetensors"), Artifact("train", "model.json"))
TRAIN_RESULT = result("train")
TRAINED_RANKER = Artifact("train", "ranker.safetensors")  # two_stage: the ranker evaluate and the gate judge

METRICS = Artifact("evaluate", "metrics.json")
PER_USER_METRICS = Artifact("evaluate", "per_user.parquet")

DECISION = Artifact("gate", "decision.json")
PAIRED = Artifact("gate", "paired.parquet")

REFITTED = ModelArtifacts(Artifact("refit", "model.safetensors"), Artifact("refit", "model.json"))
REFIT_RESULT = result("refit")
REFIT_RANKER = Artifact("refit", "ranker.safetensors")  # two_stage: the ranker learned from every event

INDEX = Artifact("index", "items.faiss")
INDEX_INFO = Artifact("index", "info.json")


def challenger_key(tenant: str) -> str:
    """The release the gate published as challenger (pipeline/experiments/challenger.py), while there is one."""
    return f"tenants/{tenant}/challenger.json"


def impressions_prefix(tenant: str) -> str:
    """Serving's impression log (pipeline/serving/impressions.py): dt=YYYY-MM-DD/{writer}-{seq}.parquet."""
    return f"tenants/{tenant}/impressions"


def experiment_prefix(tenant: str, experiment: str) -> str:
    """An experiment's daily reports (reports/{day}.json) and promotions (pipeline/experiments/)."""
    return f"tenants/{tenant}/experiments/{experiment}"
