"""index: a FAISS inner-product index over the published model's item vectors.

Small catalogs get an exact IndexFlatIP. Above `index.exact_max_items` (or when asked) an
ANN index (HNSW, or IVF) is built, and its recall@10 against exact numpy search is
measured at build time on item and user vectors; the search knob (efSearch / nprobe) is
doubled until `index.min_recall` is met, otherwise the build fails (`IndexQualityError`)
rather than shipping silently worse recommendations. The measured recall and the tuned
knob go into the stage result and the release manifest.

Ids are the release's item indices, so no id map is needed. `search` is the one entry
point for serving: it returns exactly min(k, eligible) items per query whatever is
excluded or filtered out, falling back to exact scoring where the index cannot.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from pipeline import train
from pipeline.config.tenant import IndexConfig
from pipeline.context import RunContext

STAGE = "index"
OUTPUT = "items.faiss"
RECALL_K = 10
MAX_EF_SEARCH = 4096  # HNSW beyond this is slower than a flat scan of any catalog we'd serve
EXACT_SCORING_MAX = 4096  # `allowed` sets up to this size are scored exactly (~0.1 ms at 64 dims)
_IVF_MIN_POINTS_PER_LIST = 39  # below this FAISS k-means warns and centroids are noise
_SCORE_CHUNK = 1 << 24  # floats per exact-scoring block (64 MiB), bounds memory on big catalogs


class IndexQualityError(RuntimeError):
    """The ANN index cannot reach `min_recall` against exact search even at the widest search."""

    def __init__(self, message: str, info: dict[str, Any]) -> None:
        super().__init__(message)
        self.info = info


@contextmanager
def _omp_threads(n: int) -> Iterator[None]:
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def choose_kind(n_items: int, cfg: IndexConfig) -> str:
    if cfg.kind != "auto":
        return cfg.kind
    # IVF over HNSW: on 50k x 64 inner-product vectors IVF reached recall 0.96 on user queries
    # at nprobe 32 in 0.07 ms/query and built in ~1 s; HNSW needed efSearch 512 (0.5 ms, ~10 s).
    return "flat" if n_items <= cfg.exact_max_items else "ivf"


def ivf_nlist(n_items: int, cfg: IndexConfig) -> int:
    """~4*sqrt(n) lists, but never so many that k-means has < 39 points per centroid."""
    want = cfg.ivf_nlist or round(4 * math.sqrt(n_items))
    return int(max(1, min(want, n_items // _IVF_MIN_POINTS_PER_LIST, n_items)))


def _exact_kth(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """The k-th largest exact score of each query (the recall threshold)."""
    n = len(x)
    out = np.empty(len(q), dtype=np.float32)
    step = max(1, _SCORE_CHUNK // n)
    for i in range(0, len(q), step):
        s = q[i : i + step] @ x.T
        out[i : i + step] = np.partition(s, n - k, axis=1)[:, n - k]
    return out


def _recall(index, x: np.ndarray, q: np.ndarray, kth: np.ndarray, k: int, x_norm: float | None = None) -> float:
    """recall@k by score: a returned item counts if it scores >= the exact k-th score.

    Ties make ids ambiguous (popularity scores, duplicate items), so identities are not
    compared; the tolerance is relative to |q|*max|x|, the scale of float32 dot errors.
    """
    _, got = index.search(q, k)
    valid = got >= 0
    scores = np.einsum("qd,qkd->qk", q, x[np.maximum(got, 0)])
    x_norm = float(np.linalg.norm(x, axis=1).max()) if x_norm is None else x_norm
    tol = 1e-5 * np.linalg.norm(q, axis=1) * x_norm
    return float((valid & (scores >= (kth - tol)[:, None])).mean())


def _probes(x: np.ndarray, queries: np.ndarray | None, cfg: IndexConfig) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(cfg.seed)
    out = {"items": x[np.sort(rng.choice(len(x), size=min(cfg.recall_probes, len(x)), replace=False))]}
    if queries is not None and len(queries):
        q = np.ascontiguousarray(queries, dtype=np.float32)
        out["users"] = q[np.sort(rng.choice(len(q), size=min(cfg.recall_probes, len(q)), replace=False))]
    return out


def _knob(index, kind: str, value: int | None = None) -> int | None:
    """Read (or set) the search-time knob: efSearch for HNSW, nprobe for IVF."""
    import faiss

    if kind == "hnsw":
        hnsw = faiss.downcast_index(index).hnsw
        if value is not None:
            hnsw.efSearch = int(value)
        return int(hnsw.efSearch)
    if kind == "ivf":
        ivf = faiss.extract_index_ivf(index)
        if value is not None:
            ivf.nprobe = int(value)
        return int(ivf.nprobe)
    return None


def _construct(x: np.ndarray, kind: str, cfg: IndexConfig) -> tuple[Any, dict[str, Any], int, int]:
    """(index with x added, params, starting knob, widest knob). Single-threaded: HNSW's
    parallel insertion order is unspecified, so only a 1-thread build gives the same bytes
    (and so the same content-addressed release) for the same vectors."""
    import faiss

    n, d = x.shape
    with _omp_threads(1):
        if kind == "flat":
            index = faiss.IndexFlatIP(d)
            index.add(x)
            return index, {}, 0, 0
        if kind == "hnsw":
            # level assignment uses FAISS's fixed seed (not settable from Python)
            index = faiss.IndexHNSWFlat(d, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = cfg.hnsw_ef_construction
            index.add(x)
            params = {"m": cfg.hnsw_m, "ef_construction": cfg.hnsw_ef_construction}
            return index, params, cfg.hnsw_ef_search, max(cfg.hnsw_ef_search, MAX_EF_SEARCH)
        if kind == "ivf":
            nlist = ivf_nlist(n, cfg)
            quantizer = faiss.IndexFlatIP(d)
            index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
            index.cp.seed = cfg.seed
            index.train(x)
            index.add(x)
            return index, {"nlist": nlist}, min(cfg.ivf_nprobe, nlist), nlist
    raise ValueError(f"unknown index kind {kind!r}")


def build_index(
    item_vectors: np.ndarray, cfg: IndexConfig | None = None, queries: np.ndarray | None = None
) -> tuple[Any, dict[str, Any]]:
    """Build the index `cfg` asks for and prove its recall@10 against exact search.

    Probes are `cfg.recall_probes` item vectors plus as many rows of `queries` (user vectors:
    what serving really asks). For ANN kinds the knob doubles until the worst of the two
    recalls reaches `cfg.min_recall`; if the widest setting still misses, IndexQualityError.
    Returns (index, info) with kind, items, dim, recall_at_10_vs_exact, ef_search or
    nprobe, params and build_seconds (info is what `deserialize`/`configure` re-apply).
    """
    cfg = cfg or IndexConfig()
    x = np.ascontiguousarray(item_vectors, dtype=np.float32)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"item vectors must be a non-empty 2-D array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("item vectors contain NaN or infinite values")
    n, d = x.shape
    kind = choose_kind(n, cfg)
    started = time.perf_counter()
    index, params, knob, widest = _construct(x, kind, cfg)

    k = min(RECALL_K, n)
    probes = _probes(x, queries, cfg)
    kth = {name: _exact_kth(x, q, k) for name, q in probes.items()}
    x_norm = float(np.sqrt(np.einsum("nd,nd->n", x, x).max()))
    tuning: list[list[float]] = []
    while True:
        if kind != "flat":
            _knob(index, kind, knob)
        recalls = {name: _recall(index, x, q, kth[name], k, x_norm) for name, q in probes.items()}
        worst = min(recalls.values())
        if kind != "flat":
            tuning.append([knob, round(worst, 4)])
        if worst >= cfg.min_recall or kind == "flat" or knob >= widest:
            break
        knob = min(2 * knob, widest)

    info: dict[str, Any] = {
        "kind": kind,
        "metric": "inner_product",
        "items": int(n),
        "dim": int(d),
        "recall_at_10_vs_exact": round(worst, 4),
        "recall_at_10": {name: round(r, 4) for name, r in recalls.items()},
        "recall_probes": {name: len(q) for name, q in probes.items()},
        "min_recall": cfg.min_recall,
        "params": params,
        "build_seconds": round(time.perf_counter() - started, 3),
    }
    if kind == "hnsw":
        info["ef_search"] = knob
    elif kind == "ivf":
        info["nprobe"] = knob
    if tuning:
        info["tuning"] = tuning
    if worst < cfg.min_recall:
        knob_name = {"hnsw": "ef_search", "ivf": "nprobe"}.get(kind)
        widest_txt = f" even at {knob_name}={knob}" if knob_name else ""
        raise IndexQualityError(
            f"{kind} index recall@10 vs exact search is {worst:.3f} "
            f"({', '.join(f'{name} {r:.3f}' for name, r in recalls.items())}){widest_txt}, "
            f"below min_recall {cfg.min_recall}; "
            + ("raise index.hnsw_m / index.hnsw_ef_construction, or " if kind == "hnsw" else "")
            + "use index.kind: flat",
            info,
        )
    return index, info


def serialize(index) -> bytes:
    import faiss

    return faiss.serialize_index(index).tobytes()


def configure(index, info: dict[str, Any] | None) -> Any:
    """Re-apply the build-time tuned efSearch / nprobe (FAISS 1.15 also persists them; this
    keeps the manifest authoritative for any index bytes, whatever FAISS writes)."""
    if info:
        if info.get("ef_search") is not None and info.get("kind") == "hnsw":
            _knob(index, "hnsw", info["ef_search"])
        if info.get("nprobe") is not None and info.get("kind") == "ivf":
            _knob(index, "ivf", info["nprobe"])
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


def self_check(index, item_vectors: np.ndarray, k: int = 10, probes: int = 64, seed: int = 0) -> float:
    """recall@k of the index against exact numpy search on a sample of item queries."""
    x = np.ascontiguousarray(item_vectors, dtype=np.float32)
    rng = np.random.default_rng(seed)
    q = x[rng.choice(len(x), size=min(probes, len(x)), replace=False)]
    k = min(k, len(x))
    return _recall(index, x, q, _exact_kth(x, q, k), k)


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
    step = max(1, _SCORE_CHUNK // m)
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
            return i, d  # nothing to filter, every query full: FAISS's answer as is (saves ~50 us)
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

    if kind == "hnsw":
        return faiss.SearchParametersHNSW(efSearch=int(knob + fetch - k))
    if kind == "ivf":
        nlist = faiss.try_extract_index_ivf(index).nlist
        return faiss.SearchParametersIVF(nprobe=int(min(nlist, math.ceil(knob * math.sqrt(fetch / k)))))
    return None


# -------------------------------------------------------------------------------- stage


def index(ctx: RunContext) -> dict[str, Any]:
    log = ctx.logger(STAGE)
    import faiss

    cfg = ctx.config.index
    faiss.omp_set_num_threads(max(1, min(4, faiss.omp_get_max_threads())))
    model = train.load_model(ctx, "refit")
    vectors_ = model.item_vectors()
    users = model.user_vectors()
    rng = np.random.default_rng(cfg.seed)
    users = users[np.sort(rng.choice(len(users), size=min(cfg.recall_probes, len(users)), replace=False))]
    try:
        idx, info = build_index(vectors_, cfg, queries=users)
    except IndexQualityError as exc:
        raise ctx.error(STAGE, f"index not published: {exc}") from exc
    ctx.store.put(ctx.key(STAGE, OUTPUT), serialize(idx))
    result = {**info, "uri": ctx.store.uri(ctx.key(STAGE, OUTPUT))}
    log.info(
        "index: FAISS %s, %d items x %d dims, recall@10 vs exact %.3f (items %s, users %s)%s, built in %.1fs",
        info["kind"],
        info["items"],
        info["dim"],
        info["recall_at_10_vs_exact"],
        info["recall_at_10"].get("items"),
        info["recall_at_10"].get("users"),
        "".join(f", {key} {info[key]}" for key in ("ef_search", "nprobe") if key in info),
        info["build_seconds"],
    )
    return ctx.write_result(STAGE, result)
