"""A loaded release: what scoring needs, in memory, decoded from bytes `format` has verified."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from pipeline.storage import codecs


@dataclass(frozen=True)
class Release:
    """A verified, fully loaded release: what scoring needs, in memory, immutable."""

    tenant: str
    release_id: str
    manifest: dict[str, Any]
    user_ids: pd.Index
    item_ids: pd.Index
    user_vectors: np.ndarray
    item_vectors: np.ndarray
    seen_indptr: np.ndarray
    seen_indices: np.ndarray
    popular: np.ndarray
    item_popularity: np.ndarray
    index_bytes: bytes
    model_meta: dict[str, Any] = field(default_factory=dict)  # model.json: kind + config (fold-in needs it)
    item_category: np.ndarray | None = None  # int32 code per item, -1 = none
    categories: pd.Index = field(default_factory=lambda: pd.Index([], dtype=object))
    item_tags: sp.csr_matrix | None = None  # items x tags, True where the item has the tag
    tags: pd.Index = field(default_factory=lambda: pd.Index([], dtype=object))
    item_titles: np.ndarray | None = None  # object array of str/None, for human-readable reasons
    user_stats: pd.DataFrame | None = None  # feature_tables.user_features, one row per user_id

    def seen(self, user_row: int) -> np.ndarray:
        """The user's distinct items, most recent first."""
        return self.seen_indices[self.seen_indptr[user_row] : self.seen_indptr[user_row + 1]]


def item_attributes(data: bytes | None, n_items: int) -> dict[str, Any]:
    """Release fields from item_attributes.parquet: category codes, item x tag matrix, titles."""
    if data is None:
        return {}
    attrs = codecs.read_parquet(data)
    codes, categories = pd.factorize(attrs["category"], sort=True)  # null -> -1
    category = np.full(n_items, -1, dtype=np.int32)
    category[attrs["item_idx"].to_numpy()] = codes
    ex = attrs[["item_idx", "tags"]].explode("tags").dropna()
    tag_codes, tags = pd.factorize(ex["tags"].astype(str), sort=True)
    item_tags = sp.csr_matrix(
        (np.ones(len(ex), dtype=bool), (ex["item_idx"].to_numpy(dtype=np.int64), tag_codes)),
        shape=(n_items, len(tags)),
    )
    return {
        "item_category": category,
        "categories": pd.Index(categories.astype(str), dtype=object),
        "item_tags": item_tags,
        "tags": pd.Index(tags, dtype=object),
        "item_titles": _titles(attrs, n_items),
    }


def _titles(attrs: pd.DataFrame, n_items: int) -> np.ndarray | None:
    if "title" not in attrs or attrs["title"].isna().all():
        return None
    titles = np.full(n_items, None, dtype=object)
    titles[attrs["item_idx"].to_numpy()] = attrs["title"].astype(object).where(attrs["title"].notna(), None).to_numpy()
    return titles
