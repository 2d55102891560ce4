"""Item-item models (EASE, item-kNN): scoring, the fitted matrices and their persistence.

A user is scored from the items they have seen: scores = sum over seen items i of S[i, :],
i.e. X[u] @ S with X binary. Numpy and scipy only, so serving can import it without torch:
`score_seen` is what a server calls with a user's seen item rows and the release's S,
`seen_matrix` + `score_users` the same for a block of users, and `top_k` ranks the result
(serving and the batch export share it, so both order ties the same way).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from pipeline.models.base import TrainData


def binary_matrix(data: TrainData) -> sp.csr_matrix:
    """The user x item training matrix with 1 for every pair that has events."""
    m = sp.csr_matrix(
        (np.ones(len(data.user_idx), dtype=np.float32), (data.user_idx, data.item_idx)),
        shape=(data.n_users, data.n_items),
    )
    m.sum_duplicates()
    m.data[:] = 1.0
    return m


def weighted_matrix(data: TrainData) -> sp.csr_matrix:
    """The training matrix with each pair's event weight (the largest of its events, as in
    pipeline/models/pairs.py) at its nonzero: what EASE's and item-kNN's co-occurrences are
    built from. Equal to `binary_matrix` when every weight is 1."""
    if data.weight is None or not np.any(data.weights != 1.0):
        return binary_matrix(data)
    key = data.user_idx.astype(np.int64) * max(data.n_items, 1) + data.item_idx
    order = np.argsort(key, kind="stable")
    key = key[order]
    start = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    weight = np.maximum.reduceat(data.weights[order], start).astype(np.float32)
    pair = key[start]
    return sp.csr_matrix(
        (weight, (pair // max(data.n_items, 1), pair % max(data.n_items, 1))), shape=(data.n_users, data.n_items)
    )


def seen_matrix(indptr: np.ndarray, indices: np.ndarray, n_items: int) -> sp.csr_matrix:
    """Binary users x items X from CSR seen lists (a release's seen_indptr / seen_indices)."""
    m = sp.csr_matrix(
        (np.ones(len(indices), dtype=np.float32), np.asarray(indices, dtype=np.int64), np.asarray(indptr)),
        shape=(len(indptr) - 1, n_items),
    )
    m.sum_duplicates()
    m.data[:] = 1.0
    return m


def score_seen(similarity: sp.csr_matrix, seen_rows: np.ndarray) -> np.ndarray:
    """float32 [n_items]: one user's scores from the item rows they have seen (repeats count once)."""
    rows = np.unique(np.asarray(seen_rows, dtype=np.int64))
    if not len(rows):
        return np.zeros(similarity.shape[1], dtype=np.float32)
    return np.asarray(similarity[rows].sum(axis=0), dtype=np.float32).ravel()


def score_users(interactions: sp.csr_matrix, similarity: sp.csr_matrix, users: np.ndarray) -> np.ndarray:
    """float32 [len(users), n_items]: X[users] @ S, for a block of users at once (evaluation)."""
    return (interactions[users] @ similarity).toarray().astype(np.float32, copy=False)


def top_k(scores: np.ndarray, k: int, tie_rank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of `scores` [m, n]: the k best items (int64 [m, k]) and their scores (float32 [m, k]).

    Equal scores go to the lower `tie_rank` (a permutation of the items; serving passes the
    popularity order, so a user whose seen items reach fewer than k items gets the most
    popular of the rest, not the lowest indices). -inf marks an ineligible item: it is never
    returned, and rows with fewer than k eligible items are padded with -1 / -inf.
    """
    m, n = scores.shape
    kk = min(k, n)
    ids = np.full((m, k), -1, dtype=np.int64)
    out = np.full((m, k), -np.inf, dtype=np.float32)
    if kk == 0 or m == 0:
        return ids, out
    kth = np.partition(scores, n - kk, axis=1)[:, n - kk : n - kk + 1]  # the k-th best score per row
    # all items above the k-th score first, then the tied ones by rank: one key, one partition
    key = np.where(scores > kth, -1, np.where(scores == kth, tie_rank[None, :], n))
    pick = np.argpartition(key, kk - 1, axis=1)[:, :kk] if kk < n else np.tile(np.arange(n), (m, 1))
    picked = np.take_along_axis(scores, pick, axis=1)
    order = np.lexsort((tie_rank[pick], -picked), axis=1)
    pick, picked = np.take_along_axis(pick, order, axis=1), np.take_along_axis(picked, order, axis=1)
    ok = np.isfinite(picked)
    ids[:, :kk] = np.where(ok, pick, -1)
    out[:, :kk] = np.where(ok, picked, -np.inf)
    return ids, out


def _csr_state(name: str, m: sp.csr_matrix, values: bool = True) -> dict[str, np.ndarray]:
    out = {f"{name}_indptr": m.indptr, f"{name}_indices": m.indices}
    return {**out, f"{name}_data": m.data.astype(np.float32)} if values else out


def _csr_from_state(state: dict[str, np.ndarray], name: str, shape: tuple[int, int]) -> sp.csr_matrix:
    indices = np.asarray(state[f"{name}_indices"])
    data = state.get(f"{name}_data")
    values = np.ones(len(indices), dtype=np.float32) if data is None else np.asarray(data, dtype=np.float32)
    return sp.csr_matrix((values, indices, np.asarray(state[f"{name}_indptr"])), shape=shape)


class ItemItemModel:
    """The fitted X (binary, users x items) and S (items x items) of EASE and item-kNN, and their state.

    X is kept so the model can score its own users offline (evaluate, select, the gate); a
    server scores from the seen rows it already holds and needs only S.
    """

    kind = ""
    _X: sp.csr_matrix | None = None
    _S: sp.csr_matrix | None = None

    def _set(self, X: sp.csr_matrix, S: sp.csr_matrix) -> None:
        S = sp.csr_matrix(S, dtype=np.float32)
        S.eliminate_zeros()
        S.sort_indices()
        self._X, self._S = X, S

    def interactions(self) -> sp.csr_matrix:
        assert self._X is not None, "fit first"
        return self._X

    def similarity(self) -> sp.csr_matrix:
        assert self._S is not None, "fit first"
        return self._S

    def state(self) -> dict[str, np.ndarray]:
        X, S = self.interactions(), self.similarity()
        shape = np.array(X.shape, dtype=np.int64)
        return {"shape": shape, **_csr_state("seen", X, values=False), **_csr_state("similarity", S)}

    def load_state(self, state: dict[str, np.ndarray]):
        n_users, n_items = (int(v) for v in state["shape"])
        X = _csr_from_state(state, "seen", (n_users, n_items))
        self._set(X, _csr_from_state(state, "similarity", (n_items, n_items)))
        return self
