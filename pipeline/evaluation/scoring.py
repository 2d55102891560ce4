"""Offline scoring of any model on a holdout: full ranking, then the metrics of pipeline/evaluation/metrics.py.

Used by the evaluate stage, by selection (on its validation split) and by benchmarks, so a
number means the same thing wherever it is printed. Dot-product models are ranked with
`ranking.topk_dot`; models that score a block of users directly (`score_block`: EASE,
item-kNN) with `ranking.topk_scores`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.sparse as sp

from pipeline.evaluation import metrics, ranking
from pipeline.models import TrainData
from pipeline.models.popularity import Popularity

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
