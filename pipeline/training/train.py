"""train (on the train split, for evaluation) and refit (on every event, for publishing).

Both fit the tenant's configured model with the same code; weights are written with
safetensors, the config as JSON beside them; params and per-iteration loss go to MLflow.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from pipeline.config.models import ModelBase, model_config
from pipeline.context import RunContext
from pipeline.features import stage as features
from pipeline.models import Recommender, TrainData, TrainingDiverged, build, build_by_kind, resolve_device
from pipeline.ops import tracking

WEIGHTS = "model.safetensors"
CONFIG = "model.json"


def _fit(ctx: RunContext, stage: str, holdout: bool | None) -> dict[str, Any]:
    log = ctx.logger(stage)
    feats = features.load(ctx)
    item_features = features.load_item_features(ctx)
    data = TrainData.from_events(feats.split(holdout), feats.n_users, feats.n_items, item_features)
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
    meta = {"kind": cfg.kind, "config": config, "users": data.n_users, "items": data.n_items}
    ctx.store.put(ctx.key(stage, WEIGHTS), st_save(model.state(), metadata={"kind": cfg.kind}))
    ctx.store.put(ctx.key(stage, CONFIG), json.dumps(meta, indent=2, sort_keys=True).encode())
    result = {
        "kind": cfg.kind,
        "weights_uri": ctx.store.uri(ctx.key(stage, WEIGHTS)),
        "events": len(data.user_idx),
        "iterations": len(losses),
        "final_loss": losses[-1] if losses else None,
        "seconds": round(seconds, 3),
        "device": str(device),
        "mlflow_run_id": run.info.run_id,
    }
    log.info(
        "%s: %s fitted on %d events in %.1fs (loss %.6f)",
        stage,
        cfg.kind,
        result["events"],
        seconds,
        result["final_loss"] or float("nan"),
    )
    return ctx.write_result(stage, result)


def chosen_config(ctx: RunContext) -> ModelBase:
    """The model configuration this run trains: the select stage's choice, else `model`."""
    chosen = ctx.read_result("select")
    if chosen and chosen.get("config"):
        return model_config(chosen["config"])
    return ctx.config.model


def train(ctx: RunContext) -> dict[str, Any]:
    """Fit on the train split only: what evaluate and the gate judge."""
    return _fit(ctx, "train", holdout=False)


def refit(ctx: RunContext) -> dict[str, Any]:
    """Fit the same config on ALL events up to the interval end: what gets published."""
    return _fit(ctx, "refit", holdout=None)


def load_model(ctx: RunContext, stage: str) -> Recommender:
    meta = json.loads(ctx.store.get(ctx.key(stage, CONFIG)))
    tensors = st_load(ctx.store.get(ctx.key(stage, WEIGHTS)))
    model = build_by_kind(meta["kind"], meta.get("config") if meta["kind"] != "popularity" else None)
    return model.load_state({k: np.asarray(v) for k, v in tensors.items()})
