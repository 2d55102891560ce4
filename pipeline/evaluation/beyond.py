"""Beyond accuracy: intra-list diversity, novelty, and every metric per user segment.

Definitions (per user, L = the user's list without padding, |L| = n):
  diversity@K  = 1 - mean over the n (n - 1) ordered pairs i != j of L of cos(v_i, v_j),
                 v_i the item's row of a feature matrix: category + tags (one-hot / multi-hot)
                 when the tenant has a catalog, else the item's column of the train matrix
                 (which users had it: behavioural similarity). An item with an all-zero row
                 is unlike every other. Lists with n < 2 have no pairs: NaN, left out of means.
                 sum_{i != j} cos = |sum_i u_i|^2 - sum_i |u_i|^2 with u_i = v_i / |v_i|, so
                 it is one sparse product for all users, no loop over pairs.
  novelty@K    = mean over L of -log2((users_i + 1) / (n_users + 1)), users_i the item's
                 distinct train users: the self-information of recommending it (popular
                 items carry little), add-one smoothed so unseen items are finite.
Coverage (share of the catalog in any list) is metrics.coverage, over any group of lists.

Segments partition the evaluated users; `segment_report` gives every metric's mean per
segment value: activity (train events, fixed buckets), cold vs warm (fewer than
COLD_USER_EVENTS train events) and each of the tenant's user attributes (text: its most
frequent values, the rest "other"; numbers: quartile bins; missing: "unknown").
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from pipeline.evaluation import metrics

ACTIVITY_EDGES = (5, 20, 50, 200)  # train events: <5, 5-19, 20-49, 50-199, 200+
COLD_USER_EVENTS = 5  # fewer train events than this: a cold user
MAX_VALUES = 12  # values shown per text attribute; the rest are "other"


def _list_matrix(topk: np.ndarray, n_items: int) -> sp.csr_matrix:
    """Binary [lists, n_items]: 1 where the item is in the list (padding -1 ignored)."""
    rows = np.repeat(np.arange(len(topk)), topk.shape[1])
    cols = topk.ravel()
    ok = cols >= 0
    m = sp.csr_matrix((np.ones(int(ok.sum()), np.float64), (rows[ok], cols[ok])), shape=(len(topk), n_items))
    m.sum_duplicates()
    m.data[:] = 1.0
    return m


def intra_list_diversity(topk: np.ndarray, item_matrix: sp.spmatrix) -> np.ndarray:
    """float64 [lists]: diversity of each list (see the module docstring); NaN for n < 2."""
    v = sp.csr_matrix(item_matrix, dtype=np.float64)
    norm = np.sqrt(np.asarray(v.multiply(v).sum(axis=1)).ravel())
    unit = sp.diags(np.divide(1.0, norm, out=np.zeros_like(norm), where=norm > 0)) @ v
    lists = _list_matrix(topk, v.shape[0])
    total = lists @ unit  # [lists, features]: sum of the list's unit vectors
    sum_sq = np.asarray(total.multiply(total).sum(axis=1)).ravel()
    self_sq = lists @ (norm > 0).astype(np.float64)  # |u_i|^2 is 1, or 0 for an all-zero row
    n = np.diff(lists.indptr).astype(np.float64)
    pairs = n * (n - 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, 1.0 - (sum_sq - self_sq) / pairs, np.nan)


def novelty(topk: np.ndarray, item_users: np.ndarray, n_users: int) -> np.ndarray:
    """float64 [lists]: mean self-information of the listed items; NaN for an empty list."""
    info = -np.log2((np.asarray(item_users, dtype=np.float64) + 1.0) / (n_users + 1.0))
    ok = topk >= 0
    bits = np.where(ok, info[np.maximum(topk, 0)], 0.0).sum(axis=1)
    count = ok.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, bits / count, np.nan)


def attribute_matrix(category: np.ndarray, tags: sp.csr_matrix) -> sp.csr_matrix:
    """[items, categories + tags]: one-hot category (-1: none) beside the tag columns."""
    n = len(category)
    has = category >= 0
    n_cat = int(category.max()) + 1 if has.any() else 0
    cat = sp.csr_matrix((np.ones(int(has.sum())), (np.flatnonzero(has), category[has])), shape=(n, n_cat))
    return sp.csr_matrix(sp.hstack([cat, sp.csr_matrix(tags, dtype=np.float64)]))


def activity_bucket(train_events: np.ndarray) -> np.ndarray:
    """Label per user from its train events: '<5', '5-19', '20-49', '50-199', '200+'."""
    edges = np.asarray(ACTIVITY_EDGES)
    labels = [f"<{edges[0]}"] + [f"{a}-{b - 1}" for a, b in zip(edges[:-1], edges[1:], strict=True)]
    labels.append(f"{edges[-1]}+")
    return np.asarray(labels, dtype=object)[np.searchsorted(edges, np.asarray(train_events), side="right")]


def attribute_segments(values: pd.Series) -> np.ndarray:
    """Labels for one user attribute (aligned with `values`): see the module docstring."""
    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        x = values.astype("float64")
        if x.notna().sum() >= 4 and x.nunique() > MAX_VALUES:
            binned = pd.qcut(x, 4, duplicates="drop")
            labels = binned.astype("string")
            return labels.fillna("unknown").to_numpy(dtype=object)
        values = x.map(lambda v: f"{v:g}", na_action="ignore")
    text = values.astype("string")
    top = text.value_counts().index[:MAX_VALUES]
    out = text.where(text.isin(top) | text.isna(), "other").fillna("unknown")
    return out.to_numpy(dtype=object)


def list_metrics(
    topk: np.ndarray, item_matrix: sp.spmatrix, item_users: np.ndarray, n_users: int
) -> dict[str, np.ndarray]:
    """Per-list diversity and novelty, to sit beside metrics.per_user_metrics."""
    return {"diversity": intra_list_diversity(topk, item_matrix), "novelty": novelty(topk, item_users, n_users)}


def _mean(values: np.ndarray) -> float | None:
    """Mean of the non-NaN values; None (JSON null) when there are none."""
    ok = ~np.isnan(values)
    return float(values[ok].mean()) if ok.any() else None


def summarize_lists(per_list: dict[str, np.ndarray], k: int) -> dict[str, float | None]:
    """Means over the lists that have a value (None when none does), named @k."""
    return {f"{name}@{k}": _mean(values) for name, values in per_list.items()}


def segment_report(
    per_user: dict[str, np.ndarray], topk: np.ndarray, n_items: int, segments: dict[str, np.ndarray], k: int
) -> dict[str, dict[str, dict[str, float | None]]]:
    """{segment: {value: {users, <metric>@k..., coverage}}} over the evaluated users.

    `per_user` holds every per-user metric (accuracy and list metrics), `segments` a label per
    evaluated user for each segmentation; all aligned with the rows of `topk`.
    """
    report: dict[str, dict[str, dict[str, float | None]]] = {}
    for name, labels in segments.items():
        labels = np.asarray(labels, dtype=object)
        groups: dict[str, dict[str, float | None]] = {}
        for value in sorted(set(labels.tolist()), key=str):  # a handful of values per segmentation
            mask = labels == value
            row: dict[str, float | None] = {"users": int(mask.sum())}
            for metric, values in per_user.items():
                row[f"{metric}@{k}"] = _mean(np.asarray(values, dtype=np.float64)[mask])
            row["coverage"] = metrics.coverage(topk[mask], n_items)
            groups[str(value)] = row
        report[name] = groups
    return report
