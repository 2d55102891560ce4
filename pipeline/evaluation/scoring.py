"""Offline scoring of any model on a holdout: full ranking, then the metrics of pipeline/evaluation/metrics.py.

Used by the evaluate stage, by selection (on its validation split), by the gate (the
challenger on fresh events) and by benchmarks, so a number means the same thing wherever it
is printed. A kind is ranked the way the registry says it scores: dot-product kinds with
`ranking.topk_dot`, item-item kinds (EASE, item-kNN: X[u] @ S) with `ranking.topk_scores`.
"""

from __future__ import annotations

from typing import cast

import numpy as np
import pandas as pd
import scipy.sparse as sp

from pipeline.evaluation import metrics, ranking
from pipeline.models import DotProduct, ItemItem, Recommender, TrainData, registry
from pipeline.models.itemitem import score_users

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


def evaluate_model(model: Recommender, relevant: sp.csr_matrix, exclude: sp.csr_matrix, k: int) -> Evaluation:
    """`evaluate_vectors` for a model of any registered kind."""
    return evaluate_model_lists(model, relevant, exclude, k)[0]


def evaluate_model_lists(
    model: Recommender, relevant: sp.csr_matrix, exclude: sp.csr_matrix, k: int
) -> tuple[Evaluation, np.ndarray]:
    """`evaluate_model` and the top-k lists it scored ([users scored, k], -1 padded)."""
    rows = np.flatnonzero(np.diff(relevant.indptr) > 0)
    top = topk(model, rows, k, exclude=exclude[rows])
    return _score_lists(top, rows, relevant), top


def topk(
    model: Recommender,
    rows: np.ndarray,
    k: int,
    exclude: sp.csr_matrix | None = None,
    item_allowed: np.ndarray | None = None,
) -> np.ndarray:
    """The model's top-k items [len(rows), k] for these user rows (rows of `exclude` align with `rows`)."""
    if registry.scoring(model.kind) == "item_item":
        n_items = cast(ItemItem, model).similarity().shape[0]
        return ranking.topk_scores(
            lambda start, stop: user_scores(model, rows[start:stop]), len(rows), n_items, k, exclude, item_allowed
        )
    dot = cast(DotProduct, model)
    return ranking.topk_dot(dot.user_vectors()[rows], dot.item_vectors(), k, exclude=exclude, item_allowed=item_allowed)


def user_scores(model: Recommender, rows: np.ndarray) -> np.ndarray:
    """float32 [len(rows), n_items]: every item's score for these users, as `topk` ranks them."""
    if registry.scoring(model.kind) == "item_item":
        item_item = cast(ItemItem, model)
        return score_users(item_item.interactions(), item_item.similarity(), rows)
    dot = cast(DotProduct, model)
    return (dot.user_vectors()[rows] @ dot.item_vectors().T).astype(np.float32, copy=False)


def _score_lists(top: np.ndarray, rows: np.ndarray, relevant: sp.csr_matrix) -> Evaluation:
    hits = metrics.hits_matrix(top, rows, relevant)
    per_user = metrics.per_user_metrics(hits, np.diff(relevant.indptr)[rows])
    return metrics.summarize(per_user, top, relevant.shape[1]), per_user, rows


def baselines(data: TrainData, ease_max_items: int, knn_max_items: int | None = None) -> dict[str, Recommender]:
    """The reference models every run is compared with, fitted on the same train split with
    their kinds' default configs (EASE only up to `ease_max_items` items: a dense n^3 solve;
    item-kNN up to `knn_max_items`: its similarity is built a dense block of items at a time)."""
    kinds = baseline_kinds(data.n_items, ease_max_items, knn_max_items)
    return {kind: registry.build_by_kind(kind).fit(data) for kind in kinds}


def baseline_kinds(n_items: int, ease_max_items: int, knn_max_items: int | None = None) -> list[str]:
    """Which baselines `baselines` fits for a catalog of `n_items`."""
    kinds = ["popularity"]
    kinds += ["item_knn"] if knn_max_items is None or n_items <= knn_max_items else []
    kinds += ["ease"] if n_items <= ease_max_items else []
    return kinds


def sample_users(relevant: sp.csr_matrix, user_ids: pd.Series, max_users: int) -> sp.csr_matrix:
    """`relevant` with at most `max_users` users left to rank (the others' rows emptied).

    Full ranking costs users x items: at 2M users x 200k items it is most of an hour on two
    cores, while 100k users already pin NDCG down to about +-0.002. The kept users are those
    of lowest hash of their user id, so every run of a tenant (and the champion and the
    challenger in the gate) ranks the same users as long as they have held-out events.
    """
    has = np.diff(relevant.indptr) > 0
    if int(has.sum()) <= max_users:
        return relevant
    hashed = pd.util.hash_pandas_object(pd.Series(user_ids, dtype="string"), index=False).to_numpy()
    hashed = np.where(has, hashed, np.iinfo(np.uint64).max)
    keep = np.zeros(len(has), dtype=bool)
    keep[np.argpartition(hashed, max_users - 1)[:max_users]] = True
    kept = sp.csr_matrix(sp.diags(keep.astype(np.float32)) @ relevant)
    kept.eliminate_zeros()
    return kept


def at_k(summary: dict[str, float], k: int) -> dict[str, float]:
    """{'ndcg': x} -> {'ndcg@10': x}; coverage and users keep their names."""
    return {(f"{n}@{k}" if n in metrics.METRICS else n): v for n, v in summary.items()}
