"""evaluate: Recall/NDCG/MAP/HitRate/Precision@K and coverage on the temporal holdout.

Full ranking: every item is a candidate except the user's own training items. The
popularity baseline is scored the same way, on the same users, so the numbers compare.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from pipeline import features, metrics, ranking, tracking, train
from pipeline.context import RunContext
from pipeline.models import TrainData
from pipeline.models.popularity import Popularity
from pipeline.storage import codecs

STAGE = "evaluate"


def evaluate_vectors(
    user_vectors: np.ndarray,
    item_vectors: np.ndarray,
    relevant: sp.csr_matrix,
    exclude: sp.csr_matrix,
    k: int,
    item_allowed: np.ndarray | None = None,
) -> tuple[dict[str, float], dict[str, np.ndarray], np.ndarray]:
    """Score users that have relevant items: (summary, per-user metrics, their user rows)."""
    rows = np.flatnonzero(np.diff(relevant.indptr) > 0)
    top = ranking.topk_dot(user_vectors[rows], item_vectors, k, exclude=exclude[rows], item_allowed=item_allowed)
    hits = metrics.hits_matrix(top, rows, relevant)
    per_user = metrics.per_user_metrics(hits, np.diff(relevant.indptr)[rows])
    return metrics.summarize(per_user, top, relevant.shape[1]), per_user, rows


def at_k(summary: dict[str, float], k: int) -> dict[str, float]:
    """{'ndcg': x} -> {'ndcg@10': x}; coverage and users keep their names."""
    return {(f"{n}@{k}" if n in metrics.METRICS else n): v for n, v in summary.items()}


def evaluate(ctx: RunContext) -> dict[str, Any]:
    log = ctx.logger(STAGE)
    k = ctx.config.evaluation.k
    feats = features.load(ctx)
    relevant, exclude = feats.relevant(), feats.matrix(False)
    model = train.load_model(ctx, "train")
    train_data = TrainData.from_events(feats.split(False), feats.n_users, feats.n_items)
    candidates = {model.kind: model, "popularity": Popularity().fit(train_data)}
    results: dict[str, dict[str, float]] = {}
    per_user_cols: dict[str, Any] = {}
    for name, m in candidates.items():
        summary, per_user, rows = evaluate_vectors(m.user_vectors(), m.item_vectors(), relevant, exclude, k)
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
