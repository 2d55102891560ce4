"""Popularity baseline: rank items by how many distinct users interacted with them.

As a dot-product model: every user vector is [1.0], every item vector is [normalised count],
so it flows through the same ranking, index and serving code as the learned models.
"""

from __future__ import annotations

import numpy as np

from pipeline.models.base import ProgressCallback, TrainData


class Popularity:
    kind = "popularity"

    def __init__(self) -> None:
        self._counts: np.ndarray | None = None
        self._n_users = 0

    def fit(self, data: TrainData, callback: ProgressCallback | None = None) -> Popularity:
        pairs = np.unique(data.user_idx.astype(np.int64) * data.n_items + data.item_idx)
        self._counts = np.bincount(pairs % data.n_items, minlength=data.n_items).astype(np.float64)
        self._n_users = data.n_users
        return self

    @classmethod
    def from_counts(cls, users_per_item: np.ndarray, n_users: int) -> Popularity:
        """The model `fit` gives, from distinct users per item already counted (a binary train
        matrix's column counts): evaluate at 100M events skips reading the events for it."""
        model = cls()
        model._counts = np.asarray(users_per_item, dtype=np.float64)
        model._n_users = n_users
        return model

    def user_vectors(self) -> np.ndarray:
        return np.ones((self._n_users, 1), dtype=np.float32)

    def item_vectors(self) -> np.ndarray:
        assert self._counts is not None, "fit first"
        # score = 1 - rank/n: exact in float32, ties broken by item index -> deterministic lists
        n = len(self._counts)
        order = np.lexsort((np.arange(n), -self._counts))
        score = np.empty(n, dtype=np.float32)
        score[order] = 1.0 - np.arange(n, dtype=np.float64) / n
        return score[:, None]

    def state(self) -> dict[str, np.ndarray]:
        assert self._counts is not None, "fit first"
        return {"item_counts": self._counts.astype(np.float32), "n_users": np.array([self._n_users], dtype=np.int64)}

    def load_state(self, state: dict[str, np.ndarray]) -> Popularity:
        self._counts = state["item_counts"].astype(np.float64)
        self._n_users = int(state["n_users"][0])
        return self
