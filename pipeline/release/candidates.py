"""Each user's top candidates and each item's nearest items, computed once at publish time
(`candidates.npy` and `neighbors.npy` in a release).

Why: a request for a known user otherwise pays a FAISS search over the whole catalog (a flat
scan of 50k x 64 floats is most of a millisecond of CPU); with the release's own top-C per user,
serving only drops what the request filters or excludes and re-scores those C rows exactly
(`LiveRelease.precomputed`). It falls back to the live search when the filters leave fewer
than the request needs, when the pool is wider than C (re-ranking), or when the user's data
is no longer the release's (folded in since publish). One batched search at publish time,
int32 [n_users, C], -1 padded, seen items excluded, hashed in the manifest like every file.
`neighbors.npy` does the same for the similar-items route: int32 [n_items, C], the item itself
excluded, so "items like this one" is a row read and an exact re-score of C rows instead of a
catalog scan on the event loop (`LiveRelease.similar_items`).
"""

from __future__ import annotations

import numpy as np

from pipeline.storage import codecs

FILE = "candidates.npy"
NEIGHBORS_FILE = "neighbors.npy"
DEFAULT_PER_USER = 100  # = the largest k: any plain request can be served from the list
BATCH = 4096  # users per index search: bounds the exclusion keys and the result block


def compute(
    index,
    item_vectors: np.ndarray,
    user_vectors: np.ndarray,
    seen_indptr: np.ndarray,
    seen_indices: np.ndarray,
    per_user: int = DEFAULT_PER_USER,
) -> np.ndarray:
    """Top `per_user` item rows per user (int32, best first, -1 padded), seen items excluded."""
    from pipeline.index import search as ann

    n_users, n_items = len(user_vectors), len(item_vectors)
    per_user = min(per_user, n_items)
    out = np.full((n_users, per_user), -1, dtype=np.int32)
    if not per_user:
        return out
    # users in order of seen-list length: a search fetches k + the block's longest list, so
    # blocks of similar lengths keep the few heavy users from widening everyone's search
    order = np.argsort(np.diff(seen_indptr), kind="stable")
    for start in range(0, n_users, BATCH):  # blocks of users, one index search each
        users = order[start : start + BATCH]
        seen = [seen_indices[seen_indptr[u] : seen_indptr[u + 1]] for u in users]
        rows, _ = ann.search(index, item_vectors, user_vectors[users], per_user, exclude=seen)
        out[users] = rows
    return out


def file_bytes(
    index_bytes: bytes,
    index_info: dict | None,
    item_vectors: np.ndarray,
    user_vectors: np.ndarray,
    seen_indptr: np.ndarray,
    seen_indices: np.ndarray,
    per_user: int = DEFAULT_PER_USER,
) -> bytes:
    """`candidates.npy` of a dot-product release, from the release's own index bytes."""
    from pipeline.index import search as ann

    index = ann.deserialize(index_bytes, index_info)
    return codecs.npy_bytes(compute(index, item_vectors, user_vectors, seen_indptr, seen_indices, per_user))


def neighbors(index, item_vectors: np.ndarray, per_item: int = DEFAULT_PER_USER) -> np.ndarray:
    """Top `per_item` item rows per item by inner product (int32, best first, -1 padded), the
    item itself excluded: what the similar-items route answers from (same search as serving)."""
    from pipeline.index import search as ann

    n_items = len(item_vectors)
    per_item = min(per_item, max(n_items - 1, 0))
    out = np.full((n_items, per_item), -1, dtype=np.int32)
    if not per_item:
        return out
    for start in range(0, n_items, BATCH):  # blocks of items, one index search each
        block = np.arange(start, min(start + BATCH, n_items))
        rows, _ = ann.search(index, item_vectors, item_vectors[block], per_item, exclude=list(block[:, None]))
        out[block] = rows
    return out


def neighbors_bytes(
    index_bytes: bytes, index_info: dict | None, item_vectors: np.ndarray, per_item: int = DEFAULT_PER_USER
) -> bytes:
    """`neighbors.npy` of a dot-product release, from the release's own index bytes."""
    from pipeline.index import search as ann

    return codecs.npy_bytes(neighbors(ann.deserialize(index_bytes, index_info), item_vectors, per_item))
