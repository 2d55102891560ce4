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

from pipeline.context import RunContext
from pipeline.evaluation.scoring import at_k, baselines, evaluate_model
from pipeline.features import stage as features
from pipeline.models import TrainData
from pipeline.ops import tracking
from pipeline.storage import codecs
from pipeline.training import train

STAGE = "evaluate"


def evaluate(ctx: RunContext) -> dict[str, Any]:
    log = ctx.logger(STAGE)
    k = ctx.config.evaluation.k
    feats = features.load(ctx)
    relevant, exclude = feats.relevant(), feats.matrix(False)
    model = train.load_model(ctx, "train")
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
    ctx.store.put(ctx.key(STAGE, "per_user.parquet"), codecs.parquet_bytes(pd.DataFrame(per_user_cols)))
    report = {"k": k, "model": model.kind, "users": int(len(per_user_cols["user_idx"])), "metrics": results}
    ctx.store.put(ctx.key(STAGE, "metrics.json"), codecs.json_bytes(report))
    train_result = ctx.read_result("train") or {}
    if train_result.get("mlflow_run_id"):
        flat = {f"{name}.{metric}": v for name, vals in results.items() for metric, v in vals.items()}
        tracking.log_metrics(ctx, train_result["mlflow_run_id"], flat)
    log.info(
        "evaluate on %d users, full ranking of %d items:\n%s", report["users"], feats.n_items, format_table(results)
    )
    return ctx.write_result(STAGE, {**report, "metrics_uri": ctx.store.uri(ctx.key(STAGE, "metrics.json"))})


def format_table(results: dict[str, dict[str, float]]) -> str:
    names = list(next(iter(results.values())).keys())
    names = [n for n in names if n != "users"]
    header = f"{'model':<12}" + "".join(f"{n:>14}" for n in names)
    lines = [header] + [f"{m:<12}" + "".join(f"{vals[n]:>14.4f}" for n in names) for m, vals in results.items()]
    return "\n".join(lines)
