"""select: choose the tenant's model configuration before training.

Candidates come from `selection.candidates` (default: just `model`). Each candidate with
`search` ranges gets a budgeted Optuna (TPE, seeded) search; the score is the selection
metric@K on a validation split carved from the TRAIN events (the last
`validation_fraction` of each user's train events), so the holdout that evaluate and the
gate judge is never seen while choosing. The winner's fixed configuration is what
train/evaluate/gate/refit then use. With one fixed candidate nothing is fitted here.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from pipeline.config.models import ModelBase, SearchRange
from pipeline.context import RunContext, StageIO
from pipeline.evaluation import scoring
from pipeline.features.dataset import Features, read_item_features, temporal_holdout
from pipeline.models import TrainData, TrainingDiverged, build, resolve_device
from pipeline.ops import tracking
from pipeline.storage import codecs, paths

STAGE = "select"
IO = StageIO(
    reads=(paths.USERS, paths.ITEMS, paths.EVENTS, paths.ITEM_FEATURES),
    writes=(paths.SELECTED_CONFIG,),
)


def validation_split(
    feats: Features, fraction: float, item_features=None
) -> tuple[TrainData, sp.csr_matrix, sp.csr_matrix]:
    """(fit data, relevant validation pairs, pairs to exclude) from the train events only."""
    train = feats.split(False)
    stamps = train["timestamp"]
    if getattr(stamps.dt, "tz", None) is not None:
        stamps = stamps.dt.tz_convert(None)
    ts = stamps.to_numpy("datetime64[us]").astype(np.int64)
    u, i = train["user_idx"].to_numpy(), train["item_idx"].to_numpy()
    val = temporal_holdout(u, ts, i, fraction)
    shape = (feats.n_users, feats.n_items)

    def binary(mask: np.ndarray) -> sp.csr_matrix:
        m = sp.csr_matrix((np.ones(int(mask.sum()), dtype=np.float32), (u[mask], i[mask])), shape=shape)
        m.sum_duplicates()
        m.data[:] = 1.0
        return m

    fit, held = binary(~val), binary(val)
    relevant = held - fit.multiply(held)
    relevant.eliminate_zeros()
    data = TrainData.from_events(train[~val], feats.n_users, feats.n_items, item_features)
    return data, sp.csr_matrix(relevant), fit


def suggest(trial, search: dict[str, Any]) -> dict[str, Any]:
    params = {}
    for name, space in sorted(search.items()):
        if isinstance(space, SearchRange):
            if space.int:
                params[name] = trial.suggest_int(name, int(space.low), int(space.high), log=space.log)
            else:
                params[name] = trial.suggest_float(name, space.low, space.high, log=space.log)
        else:
            params[name] = trial.suggest_categorical(name, list(space))
    return params


def with_params(candidate: ModelBase, params: dict[str, Any]) -> ModelBase:
    """The candidate with `params` applied, validated, and no search ranges left."""
    return type(candidate).model_validate({**candidate.model_dump(), **params, "search": {}})


def score(cfg: ModelBase, data: TrainData, relevant, exclude, k: int, metric: str, device) -> float:
    model = build(cfg, device).fit(data)
    summary, _, _ = scoring.evaluate_model(model, relevant, exclude, k)
    return float(summary[metric])


def select(ctx: RunContext) -> dict[str, Any]:
    log = ctx.logger(STAGE)
    sel = ctx.config.selection
    candidates = list(sel.candidates) or [ctx.config.model]
    if len(candidates) == 1 and not candidates[0].search:
        chosen = candidates[0].fixed()
        log.info("select: one fixed candidate (%s), nothing to search", chosen.kind)
        ctx.write(paths.SELECTED_CONFIG, codecs.json_bytes(chosen.model_dump(mode="json")))
        return ctx.write_result(STAGE, {"config": chosen.model_dump(mode="json"), "searched": False})
    import optuna

    optuna.logging.set_verbosity(logging.WARNING)
    feats = Features.read(ctx)
    data, relevant, exclude = validation_split(feats, sel.validation_fraction, read_item_features(ctx))
    if relevant.nnz == 0:
        raise ctx.error(STAGE, f"selection.validation_fraction={sel.validation_fraction} leaves no validation events")
    k, metric, device = ctx.config.evaluation.k, sel.metric, resolve_device()
    rows: list[dict[str, Any]] = []
    params = {"candidates": len(candidates), "trials": sel.trials, "metric": f"{metric}@{k}"}
    with tracking.start_run(ctx, STAGE, params) as run:
        import mlflow

        step = 0
        for n, cand in enumerate(candidates):
            started = time.perf_counter()
            if not cand.search:
                value = score(cand.fixed(), data, relevant, exclude, k, metric, device)
                best, trials = cand.fixed(), 1
            else:
                study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=sel.seed + n))

                def objective(trial, cand=cand):
                    try:
                        cfg = with_params(cand, suggest(trial, cand.search))
                        return score(cfg, data, relevant, exclude, k, metric, device)
                    except TrainingDiverged:
                        return 0.0  # a diverging corner of the space is just a bad trial

                study.optimize(objective, n_trials=sel.trials, timeout=sel.timeout_seconds)
                best, value, trials = with_params(cand, study.best_params), study.best_value, len(study.trials)
                for t in study.trials:
                    mlflow.log_metric(f"{cand.kind}_{n}.trial_{metric}_at_{k}", t.value or 0.0, step=step)
                    step += 1
            row = {
                "candidate": n,
                "kind": cand.kind,
                "value": round(float(value), 6),
                "trials": trials,
                "seconds": round(time.perf_counter() - started, 2),
                "config": best.model_dump(mode="json"),
            }
            rows.append(row)
            log.info("select: candidate %d %s: best %s@%d %.4f, %d trial(s)", n, cand.kind, metric, k, value, trials)
        winner = max(rows, key=lambda r: (r["value"], -r["candidate"]))
        mlflow.log_metric(f"best_{metric}_at_{k}", winner["value"])
        mlflow.set_tag("recsys.selected", winner["kind"])
    table = pd.DataFrame([{k_: r[k_] for k_ in ("candidate", "kind", "value", "trials", "seconds")} for r in rows])
    log.info("select: validation %s@%d on %d users\n%s", metric, k, int((np.diff(relevant.indptr) > 0).sum()), table)
    log.info("select: chose candidate %d (%s) %s", winner["candidate"], winner["kind"], winner["config"])
    result = {
        "config": winner["config"],
        "searched": True,
        "metric": f"{metric}@{k}",
        "value": winner["value"],
        "candidates": rows,
        "validation": {"events": int(relevant.nnz), "fit_events": len(data.user_idx)},
        "mlflow_run_id": run.info.run_id,
    }
    ctx.write(paths.SELECTED_CONFIG, codecs.json_bytes(winner["config"]))
    return ctx.write_result(STAGE, result)
