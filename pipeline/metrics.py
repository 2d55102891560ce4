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
