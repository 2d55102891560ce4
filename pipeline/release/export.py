"""Batch export of a release: the top-k unseen items of every user, as Parquet.

Written once per release to `tenants/{t}/exports/{release_id}/topk.parquet` (user_id, rank,
item_id, score); a rerun for the same release is a no-op. Scoring is batched (no per-user
Python loop) with the same ranking routine evaluation uses.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from pipeline.config import TenantConfig
from pipeline.evaluation import ranking
from pipeline.release import format as release
from pipeline.storage import ObjectStore, codecs, paths


def topk_table(rel: release.Release, k: int) -> pd.DataFrame:
    n_users, n_items = len(rel.user_ids), len(rel.item_ids)
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
