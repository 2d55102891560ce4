"""The model interface: every kind fits, persists its state, and scores in one of two shapes.

* DotProduct: score(u, i) = user_vectors[u] . item_vectors[i]. What FAISS and the user store
  consume. ALS, BPR, the neural models, and popularity (a 1-d model: user 1, item count).
* ItemItem: score(u, .) = X[u] @ S, X the user's seen items (binary), S a sparse item x item
  matrix. EASE and item-kNN. A server needs only S and the user's seen item rows
  (pipeline/models/itemitem.py: `score_seen`).

Which shape a kind has is the registry's word (`registry.scoring(kind)`), not a guess from
the methods an object happens to have.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:  # annotations only: a fit process need not load pandas or scipy (~90 MB RSS)
    import pandas as pd
    import scipy.sparse as sp

# Called after each epoch/iteration with (iteration, {"loss": ..., ...}); may raise to stop.
ProgressCallback = Callable[[int, dict[str, float]], None]


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf: the model is not published."""


@dataclass(frozen=True)
class ItemFeatures:
    """Catalog attributes aligned with item_idx (features stage); items may have none of them."""

    category: np.ndarray  # int64 [n_items]: category code, -1 = none
    tags: sp.csr_matrix  # [n_items, n_tags] binary
    tokens: sp.csr_matrix  # [n_items, buckets] binary: hashed title tokens


@dataclass(frozen=True)
class TrainData:
    """Indexed training events. Timestamps are epoch seconds; rating is NaN when absent.

    Items may have no events at all (catalog items); `item_features` is set when the tenant
    has a catalog, for the models that use attributes (two-tower, graph models, ALS's cold
    items). `weight` is each event's confidence weight (its type's `source.event_types`
    weight, times the rating weight when configured); None means 1 for every event. How each
    model uses it: `pipeline/models/pairs.py`.
    """

    n_users: int
    n_items: int
    user_idx: np.ndarray
    item_idx: np.ndarray
    timestamp: np.ndarray
    rating: np.ndarray
    item_features: ItemFeatures | None = None
    weight: np.ndarray | None = None

    @property
    def weights(self) -> np.ndarray:
        """float64 [events]: the events' weights (1 where none were given)."""
        if self.weight is None:
            return np.ones(len(self.user_idx), dtype=np.float64)
        return np.asarray(self.weight, dtype=np.float64)

    @classmethod
    def from_events(
        cls, events: pd.DataFrame, n_users: int, n_items: int, item_features: ItemFeatures | None = None
    ) -> TrainData:
        stamps = events["timestamp"]
        if getattr(stamps.dt, "tz", None) is not None:
            stamps = stamps.dt.tz_convert(None)
        ts = stamps.to_numpy("datetime64[s]").astype(np.int64)
        return cls(
            n_users=n_users,
            n_items=n_items,
            user_idx=events["user_idx"].to_numpy(dtype=np.int64),
            item_idx=events["item_idx"].to_numpy(dtype=np.int64),
            timestamp=ts,
            rating=events["rating"].to_numpy(dtype=np.float64),
            item_features=item_features,
            weight=events["weight"].to_numpy(dtype=np.float64) if "weight" in events else None,
        )


@runtime_checkable
class Recommender(Protocol):
    """What every kind has. Its scores come from DotProduct or ItemItem below."""

    kind: str

    def fit(self, data: TrainData, callback: ProgressCallback | None = None) -> Recommender: ...

    def state(self) -> dict[str, np.ndarray]:
        """Tensors to persist with safetensors (never pickle)."""

    def load_state(self, state: dict[str, np.ndarray]) -> Recommender: ...


@runtime_checkable
class DotProduct(Recommender, Protocol):
    def user_vectors(self) -> np.ndarray:
        """float32 [n_users, dim]"""

    def item_vectors(self) -> np.ndarray:
        """float32 [n_items, dim]"""


@runtime_checkable
class ItemItem(Recommender, Protocol):
    def interactions(self) -> sp.csr_matrix:
        """float32 [n_users, n_items], 1 per (user, item) fitted on: the rows users are scored from."""

    def similarity(self) -> sp.csr_matrix:
        """float32 [n_items, n_items] S: row i is what having seen item i adds to every item's score."""
