"""MLflow tracking for training and evaluation (one experiment per tenant).

MLflow is imported lazily (it is slow to import), and the tracking URI comes from settings:
sqlite under RECSYS_HOME by default, since MLflow 3 refuses the plain file store.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Any, Iterator

from pipeline.context import RunContext

log = logging.getLogger(__name__)


def _mlflow(ctx: RunContext):
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    import mlflow

    uri = ctx.settings.mlflow_tracking_uri
    if uri.startswith("sqlite:///"):
        os.makedirs(os.path.dirname(uri.removeprefix("sqlite:///")) or ".", exist_ok=True)
    mlflow.set_tracking_uri(uri)
    return mlflow


def experiment_name(tenant: str) -> str:
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


def log_metrics(ctx: RunContext, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
    """Log into an existing run (evaluate and gate add to the train run)."""
    mlflow = _mlflow(ctx)
    client = mlflow.MlflowClient()
    for name, value in metrics.items():
        client.log_metric(run_id, name.replace("@", "_at_"), float(value), step=step or 0)


def set_tags(ctx: RunContext, run_id: str, tags: dict[str, str]) -> None:
    mlflow = _mlflow(ctx)
    client = mlflow.MlflowClient()
    for k, v in tags.items():
        client.set_tag(run_id, k, v)
