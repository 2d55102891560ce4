"""MLflow tracking (one experiment per tenant) and the model registry (one model per tenant).

MLflow is imported lazily (it is slow to import), and the tracking URI comes from settings:
sqlite under RECSYS_HOME by default, since MLflow 3 refuses the plain file store. The
registry uses the same URI.

Registry: the registered model `recsys-{tenant}` has one model version per release that went
live, tagged `release_id` (how a version is found again: registering is idempotent),
`data_interval_end`, `model` and `metrics` (JSON), with `source` = the release folder on the
artifact store and `run_id` = the MLflow run that fitted the published weights (refit). The
alias `champion` names the version of the live release. The release pointer
(`tenants/{t}/current.json`) stays the source of truth: serving never reads the registry; the
alias mirrors the pointer and is re-synced by every publish and rollback.
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    from pipeline.context import RunContext

log = logging.getLogger(__name__)

CHAMPION_ALIAS = "champion"


_SQLITE_READY: set[str] = set()


def _import_mlflow(uri: str):
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    import mlflow

    if uri.startswith("sqlite:///"):
        os.makedirs(os.path.dirname(uri.removeprefix("sqlite:///")) or ".", exist_ok=True)
        if uri not in _SQLITE_READY:
            _create_sqlite_tables(mlflow, uri)
            _SQLITE_READY.add(uri)
    return mlflow


def _create_sqlite_tables(mlflow, uri: str) -> None:
    """MLflow creates and migrates a new sqlite DB in whichever process opens it first. The first
    tasks of several tenants, started at once, raced there and left it half-migrated (alembic's
    `_alembic_tmp_*` tables), which failed every later run; so one process at a time opens it,
    under a lock file beside it (benchmarks/tenants.py, tests/unit/test_tracking_init.py)."""
    import fcntl

    with open(uri.removeprefix("sqlite:///") + ".init.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            c = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
            c.search_experiments(max_results=1)  # the tracking store: creates or checks the tables
            c.search_registered_models(max_results=1)  # the registry store, same DB
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _mlflow(ctx: RunContext):
    uri = ctx.settings.mlflow_tracking_uri
    mlflow = _import_mlflow(uri)
    mlflow.set_tracking_uri(uri)
    return mlflow


def client(tracking_uri: str):
    """An MlflowClient for tracking and the registry at `tracking_uri` (no global state changed)."""
    mlflow = _import_mlflow(tracking_uri)
    return mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def experiment_name(tenant: str) -> str:
    return f"recsys-{tenant}"


def registered_model_name(tenant: str) -> str:
    return f"recsys-{tenant}"


@contextmanager
def start_run(ctx: RunContext, stage: str, params: dict[str, Any]) -> Iterator[Any]:
    """An MLflow run tagged with tenant, data interval and stage; yields the run object."""
    mlflow = _mlflow(ctx)
    mlflow.set_experiment(experiment_name(ctx.tenant))
    tags = {
        "recsys.tenant": ctx.tenant,
        "recsys.run_id": ctx.run_id,
        "recsys.stage": stage,
        "recsys.interval_end": ctx.interval_end.isoformat(),
    }
    with mlflow.start_run(run_name=f"{ctx.run_id}-{stage}", tags=tags) as run:
        mlflow.log_params({k: (v if v is not None else "none") for k, v in params.items()})
        yield run


def metric_key(name: str) -> str:
    """MLflow metric keys may not contain '@': ndcg@10 -> ndcg_at_10."""
    return name.replace("@", "_at_")


def log_metrics(ctx: RunContext, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
    """Log into an existing run (evaluate and gate add to the train run), in one batch."""
    from mlflow.entities import Metric

    stamp = int(time.time() * 1000)
    batch = [Metric(metric_key(k), float(v), stamp, step or 0) for k, v in metrics.items()]
    mlf = client(ctx.settings.mlflow_tracking_uri)
    for start in range(0, len(batch), 1000):  # MLflow's per-request limit
        mlf.log_batch(run_id, metrics=batch[start : start + 1000])


def cost_metrics(costs: dict[str, dict[str, Any]]) -> dict[str, float]:
    """MLflow metrics of a run's stage costs: `cost.{stage}.{cpu_s,wall_s,peak_rss_mb}` and the
    run's totals (`cost.total.cpu_s`, `cost.total.wall_s`, `cost.max.peak_rss_mb`)."""
    out = {f"cost.{s}.{k}": float(c[k]) for s, c in costs.items() for k in ("cpu_s", "wall_s", "peak_rss_mb")}
    out["cost.total.cpu_s"] = round(sum(float(c["cpu_s"]) for c in costs.values()), 3)
    out["cost.total.wall_s"] = round(sum(float(c["wall_s"]) for c in costs.values()), 3)
    out["cost.max.peak_rss_mb"] = max(float(c["peak_rss_mb"]) for c in costs.values())
    return out


def set_tags(ctx: RunContext, run_id: str, tags: dict[str, str]) -> None:
    from mlflow.entities import RunTag

    client(ctx.settings.mlflow_tracking_uri).log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


# --- registry --------------------------------------------------------------------------------


def _error_code(exc: Exception) -> str | None:
    return getattr(exc, "error_code", None)


def ensure_registered_model(mlf, tenant: str) -> str:
    name = registered_model_name(tenant)
    try:
        mlf.get_registered_model(name)
    except Exception as exc:
        if _error_code(exc) != "RESOURCE_DOES_NOT_EXIST":
            raise
        try:
            mlf.create_registered_model(
                name,
                tags={"recsys.tenant": tenant},
                description=f"Releases of tenant {tenant}; alias '{CHAMPION_ALIAS}' = the live release.",
            )
        except Exception as race:  # another publisher created it first
            if _error_code(race) != "RESOURCE_ALREADY_EXISTS":
                raise
    return name


def find_version(mlf, tenant: str, release_id: str):
    """The model version registered for `release_id`, or None (the oldest if several)."""
    name = registered_model_name(tenant)
    found = mlf.search_model_versions(f"name = '{name}' and tags.release_id = '{release_id}'")
    return min(found, key=lambda v: int(v.version)) if found else None


def ensure_version(
    mlf, tenant: str, release_id: str, source: str, manifest: dict[str, Any], run_id: str | None
) -> tuple[Any, bool]:
    """(model version of the release, created?). Looks it up by tag first: idempotent."""
    name = ensure_registered_model(mlf, tenant)
    existing = find_version(mlf, tenant, release_id)
    if existing is not None:
        return existing, False
    model = manifest.get("model", "")
    tags = {
        "release_id": release_id,
        "tenant": tenant,
        "data_interval_end": manifest.get("data_interval_end", ""),
        "model": model,
        "metrics": json.dumps(manifest.get("metrics", {}).get(model, {}), sort_keys=True),
        "gate": str((manifest.get("gate") or {}).get("reason") or "")[:4000],
    }
    version = mlf.create_model_version(
        name,
        source,
        run_id=run_id,
        tags=tags,
        description=f"release {release_id}: {model}, data up to {manifest.get('data_interval_end')}",
    )
    return version, True


def register_release(
    tracking_uri: str,
    tenant: str,
    release_id: str,
    source: str,
    manifest: dict[str, Any],
    run_id: str | None,
    champion: bool,
) -> dict[str, Any]:
    """Make sure the release has a model version; with `champion`, point the alias at it.

    Returns {"registry": "registered" | "already registered", "model_name", "model_version",
    "champion_alias": bool}. Raises whatever MLflow raises (the caller decides what that means).
    """
    mlf = client(tracking_uri)
    version, created = ensure_version(mlf, tenant, release_id, source, manifest, run_id)
    moved = False
    if champion:
        name = registered_model_name(tenant)
        try:
            current = mlf.get_model_version_by_alias(name, CHAMPION_ALIAS).version
        except Exception as exc:
            if _error_code(exc) not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise
            current = None
        if str(current) != str(version.version):
            mlf.set_registered_model_alias(name, CHAMPION_ALIAS, str(version.version))
            moved = True
    return {
        "registry": "registered" if created else "already registered",
        "model_name": registered_model_name(tenant),
        "model_version": str(version.version),
        "champion_alias": "moved" if moved else ("unchanged" if champion else "not moved"),
    }
