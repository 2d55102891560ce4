"""Request-time math on one release: filters, diversity and reasons (the ALS fold-in is the
model's: pipeline/models/als_fold.py).

Pure numpy functions of a release's arrays, vectorised over items; the only loops are over
the k picks of MMR and over the users of one request.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp


def attribute_mask(
    n_items: int,
    item_category: np.ndarray | None,
    categories: pd.Index,
    item_tags: sp.csr_matrix | None,
    tags: pd.Index,
    *,
    category: tuple[str, ...] = (),
    exclude_category: tuple[str, ...] = (),
    tag: tuple[str, ...] = (),
    exclude_tag: tuple[str, ...] = (),
) -> np.ndarray | None:
    """Boolean mask of items allowed by attribute filters (None: no filter).

    Include filters keep items in ANY listed category / with ANY listed tag; exclude filters
    drop items in any listed one. An unknown category or tag matches nothing.
    """
    if not (category or exclude_category or tag or exclude_tag):
        return None
    allowed = np.ones(n_items, dtype=bool)
    cat = item_category if item_category is not None else np.full(n_items, -1, dtype=np.int32)
    if category:
        codes = categories.get_indexer(list(category))
        allowed &= np.isin(cat, codes[codes >= 0])
    if exclude_category:
        codes = categories.get_indexer(list(exclude_category))
        allowed &= ~np.isin(cat, codes[codes >= 0])
    if tag or exclude_tag:
        m = item_tags if item_tags is not None else sp.csr_matrix((n_items, 0), dtype=bool)
        if tag:
            cols = tags.get_indexer(list(tag))
            cols = cols[cols >= 0]
            allowed &= np.asarray(m[:, cols].sum(axis=1)).ravel() > 0 if len(cols) else False
        if exclude_tag:
            cols = tags.get_indexer(list(exclude_tag))
            cols = cols[cols >= 0]
            if len(cols):
                allowed &= np.asarray(m[:, cols].sum(axis=1)).ravel() == 0
    return allowed


def mmr(rows: np.ndarray, scores: np.ndarray, item_vectors: np.ndarray, k: int, diversity: float) -> np.ndarray:
    """Maximal marginal relevance: positions into `rows` of the k picks, best first.

    Each pick maximises (1 - diversity) * relevance - diversity * max cosine to the picks so
    far; relevance is the score rescaled to [0, 1] over the candidates.
    """
    n = len(rows)
    k = min(k, n)
    if n == 0 or diversity <= 0:
        return np.arange(k)
    v = item_vectors[rows].astype(np.float32)
    v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    sims = v @ v.T
    lo, hi = float(scores.min()), float(scores.max())
    rel = (scores - lo) / (hi - lo) if hi > lo else np.ones(n, dtype=np.float32)
    max_sim = np.zeros(n, dtype=np.float32)
    taken = np.zeros(n, dtype=bool)
    picks = np.empty(k, dtype=np.int64)
    for step in range(k):  # k <= 100 picks; each is one vector operation over the candidates
        value = np.where(taken, -np.inf, (1.0 - diversity) * rel - diversity * max_sim)
        best = int(np.argmax(value))
        picks[step] = best
        taken[best] = True
        max_sim = np.maximum(max_sim, sims[best])
    return picks


def cap_per_category(rows: np.ndarray, item_category: np.ndarray | None, k: int, cap: int) -> np.ndarray:
    """Positions into score-ordered `rows` keeping at most `cap` items per category (uncategorised: no cap)."""
    if item_category is None or len(rows) == 0:
        return np.arange(min(k, len(rows)))
    cats = item_category[rows]
    order = np.argsort(cats, kind="stable")  # groups by category, keeping score order inside
    sorted_cats = cats[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_cats)) + 1]
    rank_sorted = np.arange(len(rows)) - np.repeat(starts, np.diff(np.r_[starts, len(rows)]))
    rank = np.empty(len(rows), dtype=np.int64)
    rank[order] = rank_sorted
    keep = np.flatnonzero((rank < cap) | (cats < 0))
    return keep[:k]


def reasons(rec_rows: np.ndarray, seen_rows: np.ndarray, item_vectors: np.ndarray) -> np.ndarray:
    """For each recommended item, the seen item closest to it (cosine); -1 when nothing was seen."""
    if len(seen_rows) == 0 or len(rec_rows) == 0:
        return np.full(len(rec_rows), -1, dtype=np.int64)
    rec = item_vectors[rec_rows]
    seen = item_vectors[seen_rows]
    rec = rec / np.maximum(np.linalg.norm(rec, axis=1, keepdims=True), 1e-12)
    seen = seen / np.maximum(np.linalg.norm(seen, axis=1, keepdims=True), 1e-12)
    return seen_rows[np.argmax(rec @ seen.T, axis=1)]


def popular_topk(popularity: np.ndarray, k: int, eligible: np.ndarray | None) -> np.ndarray:
    """Most popular eligible items (ties: lower index first), best first."""
    pop = popularity.astype(np.float64, copy=True)
    if eligible is not None:
        pop[~eligible] = -np.inf
    n_ok = int(np.isfinite(pop).sum())
    k = min(k, n_ok)
    if k == 0:
        return np.empty(0, dtype=np.int64)
    part = np.argpartition(-pop, k - 1)[:k] if k < len(pop) else np.arange(len(pop))
    order = np.lexsort((part, -pop[part]))
    return part[order][:k]
