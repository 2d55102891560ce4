"""What changed between two releases of a tenant, as the dashboard shows it.

Why from `candidates.npy`: every dot-product release already carries each user's top items
(seen ones excluded, computed at publish with the release's own index), so the diff costs
two file reads and a few array operations, and it compares what serving actually answers
rather than a re-scoring. Items and users are matched by id, never by row: two releases
number them independently. Item-item releases (EASE, item-kNN) carry no candidate lists;
their diff says so instead of re-scoring every user here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from pipeline.release import format as release
from pipeline.release.candidates import FILE as CANDIDATES
from pipeline.storage.base import ObjectStore

SAMPLE_ITEMS = 10  # new / dropped items listed by name, most recommended first


def _top_lists(store: ObjectStore, tenant: str, release_id: str, k: int) -> tuple[pd.Index, pd.Index, np.ndarray]:
    """(user ids, item ids, top-k item rows per user, -1 padded) of one release, checksummed."""
    from pipeline.storage import codecs

    manifest = release.read_manifest(store, tenant, release_id)
    if CANDIDATES not in manifest["files"]:
        raise LookupError(f"release {release_id} has no {CANDIDATES} (model {manifest.get('model')})")
    get = lambda name: release.read_file(store, tenant, release_id, name, manifest)  # noqa: E731
    users = pd.Index(codecs.read_parquet(get("users.parquet"))["user_id"].astype(str))
    items = pd.Index(codecs.read_parquet(get("items.parquet"))["item_id"].astype(str))
    top = codecs.read_npy(get(CANDIDATES))[:, :k]
    return users, items, top


def _counts(codes: np.ndarray, n: int) -> np.ndarray:
    """How many users have each item (by union code) in their top-k."""
    return np.bincount(codes[codes >= 0], minlength=n)


def release_diff(store: ObjectStore, tenant: str, old: str, new: str, k: int = 10) -> dict[str, Any]:
    """Top-k overlap per shared user, coverage of each release, and the items that entered or
    left the recommendations (by how many users get them), plus catalog and user changes."""
    out: dict[str, Any] = {"old": old, "new": new, "k": k}
    try:
        users_a, items_a, top_a = _top_lists(store, tenant, old, k)
        users_b, items_b, top_b = _top_lists(store, tenant, new, k)
    except LookupError as exc:
        return {**out, "available": False, "reason": str(exc)}
    union = items_a.union(items_b)
    # item rows -> union codes; the -1 padding stays -1
    map_a = np.append(union.get_indexer(items_a), -1)
    map_b = np.append(union.get_indexer(items_b), -1)
    codes_a, codes_b = map_a[top_a], map_b[top_b]

    shared = users_a.intersection(users_b)
    rows_a, rows_b = users_a.get_indexer(shared), users_b.get_indexer(shared)
    sa, sb = codes_a[rows_a], codes_b[rows_b]
    n = len(union) + 1
    # a pair (user, item) as one integer; overlap = B's pairs also in A's, per user
    user_no = np.arange(len(shared), dtype=np.int64)[:, None]
    pairs_a = np.where(sa >= 0, user_no * n + sa, -1).ravel()
    pairs_b = np.where(sb >= 0, user_no * n + sb, -1)
    common = np.isin(pairs_b, pairs_a[pairs_a >= 0]) & (pairs_b >= 0)
    listed = np.maximum((sb >= 0).sum(axis=1), 1)
    overlap = common.sum(axis=1) / listed
    hist, edges = np.histogram(overlap, bins=5, range=(0.0, 1.0))

    count_a, count_b = _counts(codes_a.ravel(), len(union)), _counts(codes_b.ravel(), len(union))
    entered = np.flatnonzero((count_b > 0) & (count_a == 0))
    left = np.flatnonzero((count_a > 0) & (count_b == 0))

    def named(codes: np.ndarray, counts: np.ndarray) -> list[dict[str, Any]]:
        order = codes[np.argsort(-counts[codes], kind="stable")][:SAMPLE_ITEMS]
        return [{"item_id": str(union[c]), "users": int(counts[c])} for c in order]

    return {
        **out,
        "available": True,
        "shared_users": len(shared),
        "new_users": int(len(users_b) - len(shared)),
        "dropped_users": int(len(users_a) - len(shared)),
        "mean_overlap": float(overlap.mean()) if len(shared) else None,
        "overlap_histogram": {
            "edges": [round(float(e), 2) for e in edges],
            "users": [int(h) for h in hist],
        },
        "unchanged_lists": int((overlap == 1.0).sum()),
        "coverage": {
            "old": float((count_a > 0).sum() / len(items_a)) if len(items_a) else 0.0,
            "new": float((count_b > 0).sum() / len(items_b)) if len(items_b) else 0.0,
        },
        "catalog": {
            "old": len(items_a),
            "new": len(items_b),
            "added": int(len(items_b.difference(items_a))),
            "removed": int(len(items_a.difference(items_b))),
        },
        "entered": {"count": len(entered), "top": named(entered, count_b)},
        "left": {"count": len(left), "top": named(left, count_a)},
    }
