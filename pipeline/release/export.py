"""Batch export of a release: the top-k unseen items of every user, as Parquet.

Written once per release to `tenants/{t}/exports/{release_id}/topk.parquet` (user_id, rank,
item_id, score); a rerun for the same release is a no-op. Scoring is batched (no per-user
Python loop): dot-product releases with the ranking routine evaluation uses, item-item
releases (EASE, item-kNN) in blocks of users, X_block @ S, ranked by `itemitem.top_k` with
ties to the more popular item, as serving ranks them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from pipeline.config import TenantConfig
from pipeline.evaluation import ranking
from pipeline.models import itemitem
from pipeline.release import format as release
from pipeline.storage import ObjectStore, codecs, paths

BLOCK_FLOATS = 1 << 24  # dense item-item scores per block of users (64 MiB)


def topk_table(rel: release.Release, k: int) -> pd.DataFrame:
    n_users, n_items = len(rel.user_ids), len(rel.item_ids)
    if rel.similarity is not None:
        top, top_scores = _item_item_topk(rel, k)
        rows, ranks = np.nonzero(top >= 0)
        items, scores = top[rows, ranks], top_scores[rows, ranks]
    else:
        seen = sp.csr_matrix(
            (np.ones(len(rel.seen_indices), np.float32), rel.seen_indices, rel.seen_indptr), shape=(n_users, n_items)
        )
        top = ranking.topk_dot(rel.user_vectors, rel.item_vectors, k, exclude=seen)
        rows, ranks = np.nonzero(top >= 0)
        items = top[rows, ranks]
        scores = np.einsum("ij,ij->i", rel.user_vectors[rows], rel.item_vectors[items])
    return pd.DataFrame(
        {
            "user_id": pd.array(rel.user_ids.to_numpy()[rows], dtype="string"),
            "rank": (ranks + 1).astype(np.int16),
            "item_id": pd.array(rel.item_ids.to_numpy()[items], dtype="string"),
            "score": scores.astype(np.float32),
        }
    )


def _item_item_topk(rel: release.Release, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k unseen items and scores of every user of an item-item release (-1 / -inf padded).

    Users with nothing seen are left empty (serving gives them the popular fallback)."""
    assert rel.similarity is not None
    X = rel.seen_matrix()
    n_users, n_items = X.shape
    top = np.full((n_users, k), -1, dtype=np.int64)
    top_scores = np.full((n_users, k), -np.inf, dtype=np.float32)
    step = max(1, BLOCK_FLOATS // max(n_items, 1))
    for start in range(0, n_users, step):  # blocks of users, each one sparse product
        block = X[start : start + step]
        dense = itemitem.score_users(X, rel.similarity, np.arange(start, start + len(block.indptr) - 1))
        coo = block.tocoo()
        dense[coo.row, coo.col] = -np.inf  # seen items are not recommended
        dense[np.diff(block.indptr) == 0] = -np.inf
        top[start : start + step], top_scores[start : start + step] = itemitem.top_k(dense, k, rel.popularity_rank)
    return top, top_scores


def export_topk(store: ObjectStore, config: TenantConfig, release_id: str | None = None) -> dict[str, Any]:
    """Export `release_id` (default: the live release). Returns the URI and row count."""
    if release_id is None:
        pointer = release.read_pointer(store, config.tenant)
        if pointer is None:
            raise ValueError(f"tenant {config.tenant}: nothing published, nothing to export")
        release_id = pointer[0]["release_id"]
    key = paths.export_key(config.tenant, release_id)
    if store.exists(key):
        return {"release_id": release_id, "uri": store.uri(key), "written": False}
    table = topk_table(release.load_release(store, config.tenant, release_id), config.export.k)
    store.put(key, codecs.parquet_bytes(table))
    return {"release_id": release_id, "uri": store.uri(key), "rows": len(table), "written": True}
