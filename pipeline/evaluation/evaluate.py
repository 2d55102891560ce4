"""evaluate: Recall/NDCG/MAP/HitRate/Precision@K and coverage on the temporal holdout.

Full ranking: every item is a candidate except the user's own training items. Baselines
fitted on the same train split are scored the same way, on the same users, so the numbers
compare: popularity, cosine item-kNN and EASE (when the catalog has at most
`evaluation.ease_max_items` items). The scoring itself is pipeline/evaluation/scoring.py.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pandas as pd

from pipeline.context import RunContext, StageIO
from pipeline.evaluation.scoring import at_k, baselines, evaluate_model
from pipeline.features.dataset import Features, read_item_features
from pipeline.models import TrainData
from pipeline.models.io import read_model
from pipeline.ops import tracking
from pipeline.storage import codecs, paths
from pipeline.twostage import stage as two_stage

STAGE = "evaluate"
IO = StageIO(
    reads=(
        paths.USERS,
        paths.ITEMS,
        paths.EVENTS,
        paths.ITEM_FEATURES,
        paths.TRAINED.weights,
        paths.TRAINED.meta,
        paths.TRAIN_RESULT,
        paths.TRAINED_RANKER,
    ),
    writes=(paths.METRICS, paths.PER_USER_METRICS),
)


def evaluate(ctx: RunContext) -> dict[str, Any]:
    log = ctx.logger(STAGE)
    k = ctx.config.evaluation.k
    feats = Features.read(ctx)
    relevant, exclude = feats.relevant(), feats.matrix(False)
    model = read_model(ctx, paths.TRAINED)
    train_data = TrainData.from_events(feats.split(False), feats.n_users, feats.n_items)
    started = time.perf_counter()
    base = baselines(train_data, ctx.config.evaluation.ease_max_items)
    log.info("evaluate: baselines %s fitted in %.1fs", sorted(base), time.perf_counter() - started)
    candidates = {model.kind: model, **{name: m for name, m in base.items() if name != model.kind}}
    results: dict[str, dict[str, float]] = {}
    per_user_cols: dict[str, Any] = {}
    for name, m in candidates.items():
        summary, per_user, rows = evaluate_model(m, relevant, exclude, k)
        results[name] = at_k(summary, k)
        per_user_cols["user_idx"] = rows.astype(np.int32)
        per_user_cols.update({f"{name}_{metric}": values for metric, values in per_user.items()})
    if ctx.config.two_stage.enabled:  # the model as one candidate source, reordered by the trained ranker
        data = TrainData.from_events(feats.split(False), feats.n_users, feats.n_items, read_item_features(ctx))
        two = two_stage.evaluate(ctx, data, model, relevant, k, paths.TRAINED_RANKER)
        if two is not None:
            results[two_stage.NAME] = at_k(two[0], k)
            per_user_cols.update({f"{two_stage.NAME}_{metric}": values for metric, values in two[1].items()})
    ctx.write(paths.PER_USER_METRICS, codecs.parquet_bytes(pd.DataFrame(per_user_cols)))
    report = {"k": k, "model": model.kind, "users": int(len(per_user_cols["user_idx"])), "metrics": results}
    ctx.write(paths.METRICS, codecs.json_bytes(report))
    train_run = ctx.read_json(paths.TRAIN_RESULT).get("mlflow_run_id") if ctx.exists(paths.TRAIN_RESULT) else None
    if train_run:
        flat = {f"{name}.{metric}": v for name, vals in results.items() for metric, v in vals.items()}
        tracking.log_metrics(ctx, train_run, flat)
    log.info(
        "evaluate on %d users, full ranking of %d items:\n%s", report["users"], feats.n_items, format_table(results)
    )
    return ctx.write_result(STAGE, {**report, "metrics_uri": ctx.uri(paths.METRICS)})


def format_table(results: dict[str, dict[str, float]]) -> str:
    names = list(next(iter(results.values())).keys())
    names = [n for n in names if n != "users"]
    header = f"{'model':<12}" + "".join(f"{n:>14}" for n in names)
    lines = [header] + [f"{m:<12}" + "".join(f"{vals[n]:>14.4f}" for n in names) for m, vals in results.items()]
    return "\n".join(lines)
