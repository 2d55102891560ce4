"""A published FAISS index as serving uses it: bytes in and out, and filtered top-k search.

`search` is the one entry point for serving: it returns exactly min(k, eligible) items per
query whatever is excluded or filtered out, falling back to exact scoring where the index
cannot. Building and tuning the index is the `index` stage (pipeline/index/build.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

EXACT_SCORING_MAX = 4096  # `allowed` sets up to this size are scored exactly (one small product)
SCORE_CHUNK = 1 << 24  # floats per exact-scoring block (64 MiB), bounds memory on big catalogs


def knob_value(index, kind: str, value: int | None = None) -> int | None:
    """Read (or set) the search-time knob: efSearch for HNSW, nprobe for IVF."""
    import faiss

    if kind == "hnsw":
        inner = faiss.downcast_index(index)
        if not isinstance(inner, faiss.IndexHNSW):
            raise TypeError(f"not an HNSW index: {type(inner).__name__}")
        hnsw = inner.hnsw
        if value is not None:
            hnsw.efSearch = int(value)
        return int(hnsw.efSearch)
    if kind == "ivf":
        ivf = faiss.extract_index_ivf(index)
        if value is not None:
            ivf.nprobe = int(value)
        return int(ivf.nprobe)
    return None


def serialize(index) -> bytes:
    import faiss

    return faiss.serialize_index(index).tobytes()


def configure(index, info: dict[str, Any] | None) -> Any:
    """Re-apply the build-time tuned efSearch / nprobe (FAISS 1.15 also persists them; this
    keeps the manifest authoritative for any index bytes, whatever FAISS writes)."""
    if info:
        if info.get("ef_search") is not None and info.get("kind") == "hnsw":
            knob_value(index, "hnsw", info["ef_search"])
        if info.get("nprobe") is not None and info.get("kind") == "ivf":
            knob_value(index, "ivf", info["nprobe"])
    return index


def deserialize(data: bytes, info: dict[str, Any] | None = None):
    """Index from bytes; `info` (the manifest's "index" entry) re-applies the tuned knob."""
    import faiss

    return configure(faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8)), info)


def vectors(index) -> np.ndarray:
    """The item vectors stored in an index (float32 [n, d]), for `search`'s exact paths."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.make_direct_map()
    return index.reconstruct_n(0, index.ntotal)


# ------------------------------------------------------------------------------- search


def _excluded(exclude: Sequence[np.ndarray | None] | None, nq: int, n: int, allowed: np.ndarray | None):
    """Per query: sorted unique in-range excluded ids that would otherwise be eligible,
    plus all of them as sorted keys q*n+id (one searchsorted tests a whole candidate batch)."""
    if exclude is None:
        return [np.empty(0, np.int64)] * nq, np.empty(0, np.int64)
    if len(exclude) != nq:
        raise ValueError(f"exclude has {len(exclude)} entries for {nq} queries")
    per: list[np.ndarray] = []
    for e in exclude:
        e = np.unique(np.asarray(e if e is not None else (), dtype=np.int64))
        e = e[(e >= 0) & (e < n)]
        per.append(e[allowed[e]] if allowed is not None else e)
    keys = np.concatenate([e + i * n for i, e in enumerate(per)]) if per else np.empty(0, np.int64)
    return per, keys


def _exact(
    x: np.ndarray,
    q: np.ndarray,
    k: int,
    cols: np.ndarray | None,
    excl: list[np.ndarray],
    allowed: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by numpy over `cols` (sorted item ids; None = all, `allowed` masking)."""
    nq = len(q)
    v = x if cols is None else x[cols]
    m = len(v)
    kk = min(k, m)
    ids = np.full((nq, k), -1, dtype=np.int64)
    scores = np.full((nq, k), -np.inf, dtype=np.float32)
    if kk == 0:
        return ids, scores
    blocked = None if allowed is None or cols is not None else ~allowed
    step = max(1, SCORE_CHUNK // m)
    for s0 in range(0, nq, step):
        rows = range(s0, min(nq, s0 + step))
        s = q[s0 : s0 + step] @ v.T
        if blocked is not None:
            s[:, blocked] = -np.inf
        r_idx = [np.full(len(excl[i]), r) for r, i in enumerate(rows)]
        c_idx = [excl[i] if cols is None else np.searchsorted(cols, excl[i]) for i in rows]
        if r_idx:
            s[np.concatenate(r_idx), np.concatenate(c_idx)] = -np.inf  # excl ids are all in cols
        top = np.argpartition(s, m - kk, axis=1)[:, m - kk :] if kk < m else np.tile(np.arange(m), (len(s), 1))
        top_s = np.take_along_axis(s, top, axis=1)
        top_ids = top if cols is None else cols[top]
        order = np.lexsort((top_ids, -top_s), axis=1)  # score desc, then item id: deterministic
        top_s = np.take_along_axis(top_s, order, axis=1)
        top_ids = np.take_along_axis(top_ids, order, axis=1)
        ok = np.isfinite(top_s)
        ids[s0 : s0 + len(s), :kk] = np.where(ok, top_ids, -1)
        scores[s0 : s0 + len(s), :kk] = np.where(ok, top_s, -np.inf)
    return ids, scores


def search(
    index,
    item_vectors: np.ndarray | None,
    queries: np.ndarray,
    k: int,
    exclude: Sequence[np.ndarray | None] | None = None,
    allowed: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k item ids (int64 [n, k]) and scores (float32 [n, k]) for each query row.

    Every query gets exactly min(k, eligible) results in descending score, eligible meaning
    `allowed` (bool mask over items, None = all) and not in its `exclude` entry (ids the user
    has seen; None = nothing); the rest is padded with -1 / -inf. Small allowed sets are
    scored exactly with numpy (an ANN index would rarely meet them); otherwise the index is
    asked for enough candidates to survive filtering, widened by doubling for the queries
    that came up short, and scored exactly once widening would reach half the catalog.
    `item_vectors` may be None (read back from the index: slower, pass them when serving).
    """
    q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    x = vectors(index) if item_vectors is None else np.ascontiguousarray(item_vectors, dtype=np.float32)
    n, nq = len(x), len(q)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if allowed is not None:
        allowed = np.asarray(allowed, dtype=bool)
        if allowed.shape != (n,):
            raise ValueError(f"allowed mask has shape {allowed.shape}, expected ({n},)")
    n_allowed = n if allowed is None else int(allowed.sum())
    excl, keys = _excluded(exclude, nq, n, allowed)
    want = np.array([min(k, n_allowed - len(e)) for e in excl], dtype=np.int64)

    # candidates needed so that k survive: the excluded may all rank on top, and only a
    # share n_allowed/n of the rest is allowed (x1.5 margin for the spread)
    most_excluded = max((len(e) for e in excl), default=0)
    fetch = k + most_excluded
    if allowed is not None and n_allowed < n:
        fetch = math.ceil(fetch * 1.5 * n / max(n_allowed, 1))
    if allowed is not None and (n_allowed <= EXACT_SCORING_MAX or fetch > n // 2):
        return _exact(x, q, k, np.flatnonzero(allowed), excl, None)

    kind, knob = _kind_and_knob(index)
    ids = np.full((nq, k), -1, dtype=np.int64)
    scores = np.full((nq, k), -np.inf, dtype=np.float32)
    todo = np.arange(nq)
    fetch = min(fetch, n)
    while todo.size:
        if fetch > n // 2:  # numpy beats a heap this wide, and an ANN index may not reach it
            got_ids, got_scores = _exact(x, q[todo], k, None, [excl[i] for i in todo], allowed)
            ids[todo], scores[todo] = got_ids, got_scores
            break
        d, i = index.search(q[todo], fetch, params=_widened(index, kind, knob, fetch, k))
        keep = i >= 0
        if allowed is None and not keys.size and fetch == k and keep.all():
            return i, d  # nothing to filter, every query full: FAISS's answer as is
        if allowed is not None:
            keep &= allowed[np.maximum(i, 0)]
        if keys.size:
            cand = i + (todo * n)[:, None]
            pos = np.minimum(np.searchsorted(keys, cand), keys.size - 1)
            keep &= keys[pos] != cand
        done = keep.sum(axis=1) >= want[todo]
        if done.any():
            first = np.argsort(~keep[done], axis=1, kind="stable")[:, :k]  # kept, in index order
            rows = todo[done]
            pad = np.arange(first.shape[1])[None, :] >= want[rows][:, None]
            ids[rows, : first.shape[1]] = np.where(pad, -1, np.take_along_axis(i[done], first, axis=1))
            scores[rows, : first.shape[1]] = np.where(pad, -np.inf, np.take_along_axis(d[done], first, axis=1))
        todo = todo[~done]
        fetch = min(2 * fetch, n)
    return ids, scores


def _kind_and_knob(index) -> tuple[str, int | None]:
    import faiss

    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexHNSW):
        return "hnsw", int(inner.hnsw.efSearch)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        return "ivf", int(ivf.nprobe)
    return "flat", None


def _widened(index, kind: str, knob: int | None, fetch: int, k: int):
    """Search parameters for `fetch` candidates at the recall the knob was tuned for at k.

    The tuned knob buys recall@k; the k items a filtered query keeps sit deeper, at rank
    ~fetch, so HNSW gets the same beam slack on top of fetch and IVF probes more lists
    (sqrt growth: the excluded mostly sit in the query's nearest lists); fetch == k gives
    exactly the tuned knob. Passed per call: concurrent requests never mutate the index.
    """
    import faiss

    if knob is None:  # flat: no knob to widen
        return None
    if kind == "hnsw":
        # faiss 1.15's stub omits SearchParametersHNSW (the SWIG module has it, kwargs included)
        return faiss.SearchParametersHNSW(efSearch=int(knob + fetch - k))  # type: ignore[attr-defined]
    if kind == "ivf":
        params = faiss.SearchParametersIVF()
        params.nprobe = int(min(faiss.extract_index_ivf(index).nlist, math.ceil(knob * math.sqrt(fetch / k))))
        return params
    return None
