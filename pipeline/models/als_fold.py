"""The ALS user fold-in: a user's vector from their history with the item factors fixed.

One closed form, used twice: by `ALS.fit` for its final user re-solve (pipeline/models/als.py,
batched on torch) and by serving when a user's new events arrive (`fold_in_user`, one user,
numpy). Both take the confidence, recency target and regularisation from here, so a user who
just acted is scored like a trained one. Numpy only: serving imports it without torch.

    x_u = argmin sum_i c_ui (p_ui - x.y_i)^2 + r_u |x|^2   over ALL items (p = 0, c = 1 unseen)
        = (Y^T Y + sum_seen (c_ui - 1) y_i y_i^T + r_u I)^-1  sum_seen c_ui p_ui y_i
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.config.models import ALSConfig
from pipeline.models.pairs import recency_target


@dataclass(frozen=True)
class FoldInTerms:
    """The recency target and regularisation of the user solve whose vectors are served."""

    half_life: float | None
    floor: float
    regularization: float


def fold_in_terms(config: ALSConfig) -> FoldInTerms:
    """The sharper fold-in terms when `fold_in_half_life` is set (ALS re-solves users with them
    after training), else the training objective's own."""
    if config.fold_in_half_life:
        return FoldInTerms(config.fold_in_half_life, config.fold_in_floor, config.fold_in_regularization)
    return FoldInTerms(config.recency_half_life, config.recency_floor, config.regularization)


def confidence(events: np.ndarray, alpha: float, weight: np.ndarray | None = None) -> np.ndarray:
    """c = 1 + alpha * w * log2(1 + events of the pair); w = the pair's event weight (1 when None)."""
    c = np.add(1.0, np.asarray(events, dtype=np.float64))  # one array, updated in place (68 MB at 8.5M pairs)
    np.log2(c, out=c)
    if weight is not None:
        c *= np.asarray(weight, dtype=np.float64)
    c *= alpha
    c += 1.0
    return c


def row_regularization(pairs: np.ndarray, lam: float, exponent: float) -> np.ndarray:
    """r = lambda * max(pairs of the row, 1) ** exponent (ALS-WR at exponent 1)."""
    return lam * np.power(np.maximum(np.asarray(pairs), 1).astype(np.float64), exponent)


def fold_in_user(
    item_vectors: np.ndarray,
    gram: np.ndarray,
    history_rows: np.ndarray,
    event_counts: np.ndarray,
    config: ALSConfig,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """float32 [factors]: the exact solve for one user.

    `history_rows`: distinct item rows, most recent first (rank = how many are newer; the
    trainer ranks pairs tied at the same second alike, a request cannot tell them apart);
    `event_counts`: events per item; `weights`: each item's event weight (None: 1, what
    serving passes: a seen list does not keep event types); `gram`: Y^T Y of `item_vectors` in float64 (cached per
    release by the caller).
    """
    terms = fold_in_terms(config)
    rows = np.asarray(history_rows, dtype=np.int64)
    target = recency_target(np.arange(len(rows), dtype=np.float64), terms.half_life, terms.floor)
    conf = confidence(event_counts, config.alpha, weights)
    reg = float(row_regularization(np.array([len(rows)]), terms.regularization, config.reg_exponent)[0])
    y = item_vectors[rows].astype(np.float64)
    a = gram + (y.T * (conf - 1.0)) @ y + reg * np.eye(y.shape[1])
    return np.linalg.solve(a, y.T @ (conf * target)).astype(np.float32)
