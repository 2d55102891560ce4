"""Top-K ranking metrics as pure, vectorised functions (binary relevance).

Definitions (per user, K = list length, R = relevant items, hits = relevance of ranks 1..K):
  precision@K = |hits| / K
  recall@K    = |hits| / |R|
  hit_rate@K  = 1 if |hits| > 0
  ndcg@K      = sum_r hit_r / log2(r + 1)  /  sum_{r <= min(|R|, K)} 1 / log2(r + 1)
  map@K       = sum_r hit_r * precision@r  /  min(|R|, K)
Users with no relevant items are not scored. Catalog coverage is computed over all lists.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

METRICS = ("precision", "recall", "hit_rate", "ndcg", "map")


def hits_matrix(topk: np.ndarray, rows: np.ndarray, relevant: sp.csr_matrix) -> np.ndarray:
    """hits[j, r] = True when item topk[j, r] is relevant for user rows[j]. No per-user loop."""
    n_items = relevant.shape[1]
    rel = relevant.tocoo()
    rel_keys = np.sort(rel.row.astype(np.int64) * n_items + rel.col)
    keys = rows.astype(np.int64)[:, None] * n_items + topk.astype(np.int64)
    pos = np.searchsorted(rel_keys, keys)
    pos = np.minimum(pos, max(len(rel_keys) - 1, 0))
    if not len(rel_keys):
        return np.zeros(keys.shape, dtype=bool)
    return (rel_keys[pos] == keys) & (topk >= 0)


def per_user_metrics(hits: np.ndarray, n_relevant: np.ndarray) -> dict[str, np.ndarray]:
    """Per-user metric arrays from a [users, K] hit matrix and each user's |R| (> 0)."""
    hits = hits.astype(np.float64)
    k = hits.shape[1]
    n_rel = n_relevant.astype(np.float64)
    n_hits = hits.sum(axis=1)
    ranks = np.arange(1, k + 1, dtype=np.float64)
    disc = 1.0 / np.log2(ranks + 1.0)
    ideal = np.cumsum(disc)[np.minimum(n_rel, k).astype(np.int64) - 1]
    prec_at_r = np.cumsum(hits, axis=1) / ranks
    return {
        "precision": n_hits / k,
        "recall": n_hits / n_rel,
        "hit_rate": (n_hits > 0).astype(np.float64),
        "ndcg": (hits * disc).sum(axis=1) / ideal,
        "map": (hits * prec_at_r).sum(axis=1) / np.minimum(n_rel, k),
    }


def coverage(topk: np.ndarray, n_items: int) -> float:
    """Share of the catalog that appears in at least one list."""
    return float(len(np.unique(topk[topk >= 0])) / n_items) if n_items else 0.0


def summarize(per_user: dict[str, np.ndarray], topk: np.ndarray, n_items: int) -> dict[str, float]:
    out = {name: float(np.mean(values)) if len(values) else 0.0 for name, values in per_user.items()}
    out["coverage"] = coverage(topk, n_items)
    out["users"] = float(len(topk))
    return out


# --- item groups and the gate's statistics -------------------------------------------------
#
# Item groups are defined on the TRAIN split's popularity (distinct users per item), the data
# the challenger learned from:
#   long tail   = every item outside the head, the ceil(head_fraction * n_items) most popular
#                 items (ties broken by item index, like the popularity baseline);
#   cold items  = items with fewer than `max_users` distinct train users (0 included: items
#                 first seen in the holdout).
# Group recall is pooled over the scored users: hits on relevant items of the group divided
# by the number of relevant (user, item) pairs of the group. Pooling weighs every relevant
# pair once, which is steadier than a per-user mean when most users have 0 or 1 such items.


def long_tail_items(train_users_per_item: np.ndarray, head_fraction: float) -> np.ndarray:
    """Boolean mask of long-tail items: all but the top ceil(head_fraction * n) by train popularity."""
    counts = np.asarray(train_users_per_item)
    n = len(counts)
    head = min(n, int(np.ceil(head_fraction * n - 1e-9)))
    order = np.lexsort((np.arange(n), -counts))
    tail = np.ones(n, dtype=bool)
    tail[order[:head]] = False
    return tail


def cold_items(train_users_per_item: np.ndarray, max_users: int) -> np.ndarray:
    """Boolean mask of cold items: fewer than `max_users` distinct users in the train split."""
    return np.asarray(train_users_per_item) < max_users


def group_recall(
    hits: np.ndarray, topk: np.ndarray, relevant_rows: sp.csr_matrix, in_group: np.ndarray
) -> tuple[float, int]:
    """(pooled recall, relevant pairs) over the items of one group.

    `hits`/`topk` are [users, K] for the scored users, `relevant_rows` their relevant items
    (same row order). Recall is NaN when the group has no relevant pair.
    """
    n_relevant = int(in_group[relevant_rows.indices].sum())
    if n_relevant == 0:
        return float("nan"), 0
    found = hits & (topk >= 0) & in_group[np.maximum(topk, 0)]
    return float(found.sum() / n_relevant), n_relevant


def bootstrap_mean_ci(
    values: np.ndarray, resamples: int = 1000, confidence: float = 0.95, seed: int = 0, max_cells: int = 1 << 22
) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap confidence interval of the mean of `values`.

    Vectorised: each chunk draws a [resamples_in_chunk, n] matrix of indices at once (chunks
    bound memory to ~max_cells indices). Seeded, so the same values give the same interval.
    For paired comparisons pass per-user differences: resampling users keeps each pair together.
    """
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    per_chunk = max(1, min(resamples, max_cells // n))
    means = np.empty(resamples, dtype=np.float64)
    for start in range(0, resamples, per_chunk):
        stop = min(start + per_chunk, resamples)
        means[start:stop] = x[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    alpha = 1.0 - confidence
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(x.mean()), float(low), float(high)
