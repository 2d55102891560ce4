"""Fitting the run's chosen model on one split: the code train and refit share.

Weights go out as safetensors with the JSON that rebuilds the model (pipeline/models/io.py);
params and per-iteration loss go to MLflow; progress goes to the task log.
"""

from __future__ import annotations

import time
from typing import Any

from pipeline.config.models import ModelBase, model_config
from pipeline.context import RunContext
from pipeline.features.dataset import read_item_features, train_data
from pipeline.models import TrainingDiverged, build, resolve_device
from pipeline.models.io import model_meta, write_model
from pipeline.ops import tracking
from pipeline.storage import paths
from pipeline.storage.paths import Artifact, ModelArtifacts

# what both fits read: the model select chose and the indexed tables
READS = (paths.SELECTED_CONFIG, paths.USERS, paths.ITEMS, paths.EVENTS, paths.ITEM_FEATURES)


def chosen_config(ctx: RunContext) -> ModelBase:
    """The model configuration this run fits: the one select wrote."""
    return model_config(ctx.read_json(paths.SELECTED_CONFIG))


def fit(
    ctx: RunContext, stage: str, holdout: bool | None, out: ModelArtifacts, ranker: Artifact | None = None
) -> dict[str, Any]:
    """Fit the chosen model on the train split (holdout=False) or on every event (None); with
    `two_stage` on, also the ranker, learned from the same events only (pipeline/twostage/stage.py)."""
    log = ctx.logger(stage)
    data = train_data(ctx, holdout, read_item_features(ctx))  # streamed: no events table in pandas (peak RSS)
    cfg = chosen_config(ctx)
    device = resolve_device()
    model = build(cfg, device)
    losses: list[float] = []
    params = {
        **cfg.model_dump(exclude={"search"}),
        "device": str(device),
        "events": len(data.user_idx),
        "users": data.n_users,
        "items": data.n_items,
    }
    started = time.perf_counter()
    with tracking.start_run(ctx, stage, params) as run:
        import mlflow

        def progress(it: int, values: dict[str, float]) -> None:
            losses.append(values["loss"])
            total = getattr(cfg, "iterations", None) or getattr(cfg, "epochs", "?")
            extra = " ".join(f"{k}={v:.4g}" for k, v in values.items() if k != "loss")
            log.info("%s %s iteration %d/%s loss=%.6f %s", stage, cfg.kind, it, total, values["loss"], extra)
            mlflow.log_metrics(values, step=it)

        try:
            model.fit(data, callback=progress)
        except TrainingDiverged as exc:
            mlflow.set_tag("recsys.failure", str(exc))
            raise ctx.error(stage, f"training diverged: {exc}") from exc
        seconds = time.perf_counter() - started
        mlflow.log_metric("train_seconds", seconds)
    config = cfg.model_dump(mode="json", exclude={"search"})
    write_model(ctx, out, model, model_meta(model, config, users=data.n_users, items=data.n_items))
    result = {
        "kind": cfg.kind,
        "weights_uri": ctx.uri(out.weights),
        "events": len(data.user_idx),
        "iterations": len(losses),
        "final_loss": losses[-1] if losses else None,
        "seconds": round(seconds, 3),
        "device": str(device),
        "mlflow_run_id": run.info.run_id,
    }
    if ranker is not None:
        from pipeline.twostage.stage import fit_ranker

        result["two_stage"] = fit_ranker(ctx, stage, data, cfg, device, ranker, run.info.run_id)
    log.info(
        "%s: %s fitted on %d events in %.1fs (loss %.6f)",
        stage,
        cfg.kind,
        result["events"],
        seconds,
        result["final_loss"] or float("nan"),
    )
    return ctx.write_result(stage, result)
