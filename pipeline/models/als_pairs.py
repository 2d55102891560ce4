"""ALS's per-pair arrays from the events: c - 1 and c p (float32), the fold-in's c p, sum c p^2.

Lean on memory (issue 19, benchmarks/README.md): at 8.5M pairs each float64 array is 68 MB,
so the pairs' indices are int32 and every float64 array is dropped at its last use or
updated in place; what is left are the float32 arrays the two sides hold anyway.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.config.models import ALSConfig
from pipeline.models.als_fold import confidence, fold_in_terms
from pipeline.models.base import TrainData
from pipeline.models.pairs import recency_target, training_pairs


@dataclass(frozen=True)
class ALSPairs:
    """In Pairs' order (by user, then item): the user side's."""

    user: np.ndarray  # int32 (int64 past 2**31 users or items)
    item: np.ndarray
    weight: np.ndarray  # float32: c - 1
    ctarget: np.ndarray  # float32: c p (training recency)
    fold_target: np.ndarray | None  # float32: c p with the fold-in's recency (None: no fold-in)
    constant: float  # sum c p^2, the loss's constant part


def als_pairs(data: TrainData, cfg: ALSConfig) -> ALSPairs:
    small = max(data.n_users, data.n_items) < 2**31
    pairs = training_pairs(data, index_dtype=np.int32 if small else np.int64)
    user, item, events, newer, pair_weight = pairs.user, pairs.item, pairs.events, pairs.newer, pairs.weight
    del pairs
    conf = confidence(events, cfg.alpha, pair_weight)
    del events, pair_weight
    fold_target = None
    if cfg.fold_in_half_life:
        fold = fold_in_terms(cfg)
        target = recency_target(newer, fold.half_life, fold.floor)
        target *= conf  # c p, in place
        fold_target = target.astype(np.float32)
    target = recency_target(newer, cfg.recency_half_life, cfg.recency_floor)
    del newer
    ct = conf * target
    constant = float(np.dot(ct, target))  # sum c p^2
    del target
    ctarget = ct.astype(np.float32)
    del ct
    weight = (conf - 1.0).astype(np.float32)
    return ALSPairs(user, item, weight, ctarget, fold_target, constant)
