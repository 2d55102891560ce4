"""Cold users get the popularity of users like them: per-segment popular lists in the release.

A user the tenant's user table lists but who has no events yet (signed up, never clicked)
has no vector; serving used to give them the global popular list. When the tenant has user
attributes, publish groups users by all their attributes together (each bucketed as the
evaluation's segments are: text values, numbers in quartiles, missing = "unknown";
pipeline/evaluation/beyond.py) and ships, for every segment with at least MIN_USERS users
with events, its most popular items (distinct users of the segment), and the segment of
every cold user in the table. Serving answers such a user from their segment's list,
topped up by global popularity when filters remove too much; everyone else (unknown to the
table too, or in a small segment) still gets the global list.

Files (optional in a release): segment_popular.npy (int32 [segments, popular_items], -1
padded) and segment_users.parquet (user_id, segment row).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.evaluation.beyond import attribute_segments
from pipeline.storage import codecs

POPULAR_FILE = "segment_popular.npy"
USERS_FILE = "segment_users.parquet"
MIN_USERS = 20  # users with events a segment needs before its popularity beats the global list


def segment_keys(attrs: pd.DataFrame) -> np.ndarray:
    """One key per row of the user table: 'col=value|col=value' over every attribute column."""
    cols = [c for c in attrs.columns if c != "user_id"]
    parts = [pd.Series(attribute_segments(attrs[c]), dtype="string") for c in cols]
    key = pd.Series("", index=range(len(attrs)), dtype="string")
    for col, labels in zip(cols, parts, strict=True):
        key = key + f"{col}=" + labels.reset_index(drop=True) + "|"
    return key.to_numpy(dtype=object)


def segment_files(
    user_ids: pd.Series, user_idx: np.ndarray, item_idx: np.ndarray, attrs: pd.DataFrame, n_items: int, top: int
) -> dict[str, bytes]:
    """The two files for a release (empty when no segment qualifies or no user is cold).

    `user_ids` are the release's users (row = user index); `user_idx`/`item_idx` its events.
    """
    if len(attrs) == 0 or len(attrs.columns) < 2:
        return {}
    keys = segment_keys(attrs)
    codes, names = pd.factorize(pd.Series(keys, dtype="string"), sort=True)
    table_ids = attrs["user_id"].astype("string").to_numpy()
    seg_of_user = pd.Series(codes, index=table_ids).reindex(user_ids.astype("string").to_numpy()).to_numpy()
    seg_of_user = np.where(np.isnan(seg_of_user.astype(np.float64)), -1, seg_of_user).astype(np.int64)
    n_seg = len(names)
    members = np.bincount(seg_of_user[seg_of_user >= 0], minlength=n_seg)
    keep = members >= MIN_USERS
    pair = np.unique(np.asarray(user_idx, np.int64) * max(n_items, 1) + np.asarray(item_idx, np.int64))
    seg = seg_of_user[pair // max(n_items, 1)]
    ok = (seg >= 0) & keep[np.maximum(seg, 0)]
    cell, count = np.unique(seg[ok] * n_items + pair[ok] % max(n_items, 1), return_counts=True)
    s, item = cell // n_items, cell % n_items
    order = np.lexsort((item, -count, s))  # per segment: most users first, ties by item index
    s, item = s[order], item[order]
    rank = np.arange(len(s)) - np.searchsorted(s, s)  # place within its segment
    kept = np.flatnonzero(keep)
    row_of = np.full(n_seg, -1, np.int64)
    row_of[kept] = np.arange(len(kept))
    popular = np.full((len(kept), top), -1, np.int32)
    first = rank < top
    popular[row_of[s[first]], rank[first]] = item[first]
    known = pd.Index(user_ids.astype("string").to_numpy())
    cold = ~pd.Index(table_ids).isin(known) & keep[codes]
    if not cold.any():
        return {}
    users = pd.DataFrame(
        {"user_id": pd.array(table_ids[cold], dtype="string"), "segment": row_of[codes[cold]].astype(np.int32)}
    )
    return {POPULAR_FILE: codecs.npy_bytes(popular), USERS_FILE: codecs.parquet_bytes(users)}


def boosted_popularity(item_popularity: np.ndarray, segment_rows: np.ndarray) -> np.ndarray:
    """Scores that rank the segment's list first (in its order), then every other item by
    global popularity: what the fallback ranks for a cold user with a segment."""
    pop = np.asarray(item_popularity, dtype=np.float64)
    out = pop / (float(pop.max(initial=0.0)) + 1.0)  # [0, 1)
    rows = segment_rows[segment_rows >= 0]
    out[rows] = 2.0 + (len(rows) - np.arange(len(rows))) / max(len(rows), 1)
    return out
