"""evaluate: Recall/NDCG/MAP/HitRate/Precision@K and coverage on the temporal holdout.

Full ranking: every item is a candidate except the user's own training items. Baselines
fitted on the same train split are scored the same way, on the same users, so the numbers
compare: popularity, cosine item-kNN and EASE (when the catalog has at most
`evaluation.ease_max_items` items). Dot-product models are ranked with `ranking.topk_dot`;
models that score a block of users directly (`score_block`: EASE, item-kNN) with
`ranking.topk_scores`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from pipeline.context import RunContext
from pipeline.evaluation import metrics, ranking
from pipeline.features import stage as features
from pipeline.models import TrainData
from pipeline.models.popularity import Popularity
from pipeline.ops import tracking
from pipeline.storage import codecs
from pipeline.training import train

STAGE = "evaluate"


Evaluation = tuple[dict[str, float], dict[str, np.ndarray], np.ndarray]  # summary, per-user, user rows


def evaluate_vectors(
    user_vectors: np.ndarray,
    item_vectors: np.ndarray,
    relevant: sp.csr_matrix,
    exclude: sp.csr_matrix,
    k: int,
    item_allowed: np.ndarray | None = None,
) -> Evaluation:
    """Score users that have relevant items: (summary, per-user metrics, their user rows)."""
    rows = np.flatnonzero(np.diff(relevant.indptr) > 0)
    top = ranking.topk_dot(user_vectors[rows], item_vectors, k, exclude=exclude[rows], item_allowed=item_allowed)
    return _score_lists(top, rows, relevant)


def evaluate_scorer(
    score_block: Callable[[np.ndarray], np.ndarray], relevant: sp.csr_matrix, exclude: sp.csr_matrix, k: int
) -> Evaluation:
    """`evaluate_vectors` for a model that scores user rows directly: score_block(rows) -> [b, n_items]."""
    rows = np.flatnonzero(np.diff(relevant.indptr) > 0)
    top = ranking.topk_scores(
        lambda start, stop: score_block(rows[start:stop]), len(rows), relevant.shape[1], k, exclude=exclude[rows]
    )
    return _score_lists(top, rows, relevant)


def evaluate_model(model: Any, relevant: sp.csr_matrix, exclude: sp.csr_matrix, k: int) -> Evaluation:
    """Either kind of model: `score_block` when it has one, else its user and item vectors."""
    if hasattr(model, "score_block"):
        return evaluate_scorer(model.score_block, relevant, exclude, k)
    return evaluate_vectors(model.user_vectors(), model.item_vectors(), relevant, exclude, k)


def _score_lists(top: np.ndarray, rows: np.ndarray, relevant: sp.csr_matrix) -> Evaluation:
    hits = metrics.hits_matrix(top, rows, relevant)
    per_user = metrics.per_user_metrics(hits, np.diff(relevant.indptr)[rows])
    return metrics.summarize(per_user, top, relevant.shape[1]), per_user, rows


def baselines(data: TrainData, ease_max_items: int) -> dict[str, Any]:
    """The reference models every run is compared with, fitted on the same train split."""
    from pipeline.models.ease import EASE
    from pipeline.models.itemknn import ItemKNN

    out: dict[str, Any] = {"popularity": Popularity().fit(data), "item_knn": ItemKNN().fit(data)}
    if data.n_items <= ease_max_items:
        out["ease"] = EASE().fit(data)
    return out


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
