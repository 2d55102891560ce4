"""Beyond accuracy: intra-list diversity, novelty, and every metric per user segment.

Definitions (per user, L = the user's list without padding, |L| = n):
  diversity@K  = 1 - mean over the n (n - 1) ordered pairs i != j of L of cos(v_i, v_j),
                 v_i the item's row of a feature matrix: category + tags (one-hot / multi-hot)
                 when the tenant has a catalog, else the item's column of the train matrix
                 (which users had it: behavioural similarity). An item with an all-zero row
                 is unlike every other. Lists with n < 2 have no pairs: NaN, left out of means.
                 sum_{i != j} cos = |sum_i u_i|^2 - sum_i |u_i|^2 with u_i = v_i / |v_i|, so
                 it is one sparse product for all users, no loop over pairs (past
                 EXACT_WORK nonzeros, on the rows hashed to SKETCH_DIMS dimensions).
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
EXACT_WORK = 50_000_000  # nonzeros the exact diversity product may touch (its memory, ~12 bytes each)
SKETCH_DIMS = 2048  # past that: hashed dimensions (per-pair cosine error <= sqrt(2 / 2048) = 0.03)


def _list_matrix(topk: np.ndarray, n_items: int) -> sp.csr_matrix:
    """Binary [lists, n_items]: 1 where the item is in the list (padding -1 ignored)."""
    rows = np.repeat(np.arange(len(topk)), topk.shape[1])
    cols = topk.ravel()
    ok = cols >= 0
    m = sp.csr_matrix((np.ones(int(ok.sum()), np.float64), (rows[ok], cols[ok])), shape=(len(topk), n_items))
    m.sum_duplicates()
    m.data[:] = 1.0
    return m


def intra_list_diversity(topk: np.ndarray, item_matrix: sp.spmatrix, exact_work: int = EXACT_WORK) -> np.ndarray:
    """float64 [lists]: diversity of each list (see the module docstring); NaN for n < 2.

    Exact (one sparse product) while the product touches at most `exact_work` nonzeros; past
    that (behavioural rows of popular items have a nonzero per user: at 2M users the exact
    product would not fit in memory) the unit rows are first hashed to SKETCH_DIMS signed
    buckets (`sketch`, listed items only): each cosine is then an unbiased estimate, about
    +-0.03 per pair; the collisions of heavy columns are shared by all lists, so means can be
    off by a few thousandths.
    """
    v = sp.csr_matrix(item_matrix, dtype=np.float64)
    norm = np.sqrt(np.asarray(v.multiply(v).sum(axis=1)).ravel())
    unit = sp.diags(np.divide(1.0, norm, out=np.zeros_like(norm), where=norm > 0)) @ v
    del v
    lists = _list_matrix(topk, unit.shape[0])
    if float((lists @ np.diff(unit.indptr).astype(np.float64)).sum()) > exact_work:
        listed = np.flatnonzero(np.diff(lists.tocsc().indptr))  # only the items some list holds
        total = lists[:, listed] @ sketch(unit[listed], SKETCH_DIMS)  # dense [lists, SKETCH_DIMS]
        sum_sq = np.einsum("ij,ij->i", total, total, dtype=np.float64)
    else:
        total = lists @ unit  # [lists, features]: sum of the list's unit vectors
        sum_sq = np.asarray(total.multiply(total).sum(axis=1)).ravel()
    self_sq = lists @ (norm > 0).astype(np.float64)  # |u_i|^2 is 1, or 0 for an all-zero row
    n = np.diff(lists.indptr).astype(np.float64)
    pairs = n * (n - 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, 1.0 - (sum_sq - self_sq) / pairs, np.nan)


def sketch(rows: sp.csr_matrix, dims: int, seed: int = 0, block: int = 4096) -> np.ndarray:
    """float32 [rows, dims]: each column hashed to one of `dims` buckets with a random sign
    (the hashing trick, Weinberger et al. 2009): inner products of rows are preserved in
    expectation, with variance at most 2/dims for unit rows. Built `block` rows at a time."""
    rng = np.random.default_rng(seed)
    bucket = rng.integers(0, dims, rows.shape[1])
    sign = rng.choice(np.array([-1.0, 1.0]), rows.shape[1])
    out = np.empty((rows.shape[0], dims), dtype=np.float32)
    for r0 in range(0, rows.shape[0], block):
        r1 = min(r0 + block, rows.shape[0])
        lo, hi = rows.indptr[r0], rows.indptr[r1]
        cols = rows.indices[lo:hi]
        local = np.repeat(np.arange(r1 - r0, dtype=np.int64), np.diff(rows.indptr[r0 : r1 + 1]))
        flat = np.bincount(
            local * dims + bucket[cols], weights=rows.data[lo:hi] * sign[cols], minlength=(r1 - r0) * dims
        )
        out[r0:r1] = flat.reshape(r1 - r0, dims)
    return out


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
