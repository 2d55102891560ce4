"""Unique (user, item) training pairs with their event counts, weights and recency ranks.

Shared by the factor models (ALS, BPR, GraphSAGE/LightGCN): each turns the pairs into
confidences or weights its own way. Sorting-based numpy, no pandas groupby: faster, and it
builds no string-keyed index.

How event weights (`source.event_types`, and ratings when `features.rating_weight` is set)
reach every model. A pair's weight w_ui is the largest weight of its events (its strongest
signal: a viewed-then-bought item is a purchase). Recency and weight multiply; neither
replaces the other:
  ALS          c_ui = 1 + alpha * w_ui * log2(1 + events of the pair); target p_ui = recency
  BPR          sample weight recency_ui * w_ui (normalised to mean 1)
  GraphSAGE,   edge weight and positive-draw probability recency_ui * w_ui
  LightGCN
  two-tower    each event's loss weighted by its own weight (normalised per batch), and the
               user tower's history mean weighted by decay * weight
  EASE,        the Gram matrix is built from X with w_ui at the nonzeros (a purchase
  item-kNN     co-occurs more strongly); users are still scored from their binary seen
               rows, as served
With every weight 1 (no event types) all of this is exactly the unweighted model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.models.base import TrainData


@dataclass(frozen=True)
class Pairs:
    """Unique (user, item) training pairs, sorted by (user, item)."""

    user: np.ndarray  # int64 (int32 with index_dtype=np.int32)
    item: np.ndarray  # int64 (int32 with index_dtype=np.int32)
    events: np.ndarray  # float64: events of the pair
    newer: np.ndarray  # float64: k_ui, the user's other pairs at least as recent (0 = the newest)
    weight: np.ndarray  # float64: w_ui, the largest weight of the pair's events (read-only 1s without weights)


def training_pairs(data: TrainData, index_dtype: type = np.int64) -> Pairs:
    """Collapse events to pairs: count, latest timestamp, and its rank among the user's pairs.

    newer = #{the user's pairs whose latest event is at or after this one's} - 1, so pairs
    tied at the same second all count each other as newer.

    Memory: every intermediate is dropped as soon as it is used and none is made twice (at
    8.5M pairs each is 68 MB); the peak is about 5.5 of them over the caller's data. Without
    event weights `weight` is a read-only broadcast 1 (no array); `index_dtype=np.int32`
    halves user and item (ALS's fit).
    """
    n_items = max(data.n_items, 1)
    key = np.asarray(data.user_idx, dtype=np.int64) * n_items
    key += np.asarray(data.item_idx, dtype=np.int64)
    order = np.argsort(key)
    sorted_key = key[order]
    del key
    t_sorted = np.asarray(data.timestamp)[order]
    w_sorted = None if data.weight is None else data.weights[order]  # None: every weight 1, no array
    del order
    if len(sorted_key):
        start = np.flatnonzero(np.r_[True, sorted_key[1:] != sorted_key[:-1]])
    else:
        start = np.zeros(0, np.int64)
    m = len(start)
    latest = np.maximum.reduceat(t_sorted, start) if m else t_sorted[:0]
    del t_sorted
    if w_sorted is None or not m:
        weight = np.broadcast_to(np.float64(1.0), (m,))
    else:
        weight = np.maximum.reduceat(w_sorted, start)
    del w_sorted
    events = np.empty(m, dtype=np.float64)
    np.subtract(start[1:], start[:-1], out=events[:-1])
    if m:
        events[-1] = len(sorted_key) - start[-1]
    pair_key = sorted_key[start]
    del sorted_key, start
    user: np.ndarray = (pair_key // n_items).astype(index_dtype, copy=False)
    item: np.ndarray = (pair_key % n_items).astype(index_dtype, copy=False)
    del pair_key
    by_time = _by_user_then_time(user, latest)  # each user's pairs, oldest first
    u2 = user[by_time]
    t2 = latest[by_time]
    del latest
    new_group = np.r_[True, (u2[1:] != u2[:-1]) | (t2[1:] != t2[:-1])] if m else np.zeros(0, bool)
    del t2
    group_start = np.arange(m)  # first pair tied with this one
    group_start[~new_group] = 0
    del new_group
    np.maximum.accumulate(group_start, out=group_start)
    user_end = np.cumsum(np.bincount(u2, minlength=data.n_users))[u2]
    del u2
    user_end -= group_start
    del group_start
    user_end -= 1
    newer = np.empty(m)
    newer[by_time] = user_end
    return Pairs(user, item, events, newer, weight)


def _by_user_then_time(user: np.ndarray, t: np.ndarray) -> np.ndarray:
    """np.lexsort((t, user)), as one argsort of user * span + t when that fits in int64 (one sort, not two)."""
    if not len(t):
        return np.zeros(0, np.int64)
    t0, span = int(t.min()), int(t.max()) - int(t.min()) + 1
    if span * (int(user.max()) + 1) >= 2**62:
        return np.lexsort((t, user))
    key = user.astype(np.int64)  # int64 whatever user's type (int32 * span would overflow); one temporary
    key *= span
    key += t
    key -= t0
    return np.argsort(key)


def recency_target(newer: np.ndarray, half_life: float | None, floor: float) -> np.ndarray:
    """floor + (1 - floor) * 0.5 ** (newer / half_life): 1 for the newest pair, halving per half_life."""
    if not half_life:
        return np.ones_like(newer)
    out = np.divide(newer, half_life)  # one array, updated in place (68 MB at 8.5M pairs)
    np.power(0.5, out, out=out)
    out *= 1.0 - floor
    out += floor
    return out
