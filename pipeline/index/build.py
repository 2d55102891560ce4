"""index: a FAISS inner-product index over the published model's item vectors.

Small catalogs get an exact IndexFlatIP. Above `index.exact_max_items` (or when asked) an
ANN index (HNSW, or IVF) is built, and its recall@10 against exact numpy search is
measured at build time on item and user vectors; the search knob (efSearch / nprobe) is
doubled until `index.min_recall` is met, otherwise the build fails (`IndexQualityError`)
rather than shipping silently worse recommendations. The measured recall and the tuned
knob go into the stage result and the release manifest.

Ids are the release's item indices, so no id map is needed. Reading an index back and
searching it, what serving needs, is pipeline/index/search.py.

An item-item model (EASE, item-kNN; registry.scoring) has no vectors to index: serving sums
rows of its sparse S exactly. The stage then checks S (square over the catalog, finite)
and writes only `info.json` (kind "item_item", its size), removing a FAISS file a rerun of
the interval with a vector model may have left, so publish never sees a stale index.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import numpy as np

from pipeline.config.tenant import IndexConfig
from pipeline.context import RunContext, StageIO
from pipeline.index.search import SCORE_CHUNK, knob_value, serialize
from pipeline.models import DotProduct, ItemItem, registry
from pipeline.models.io import read_model
from pipeline.storage import codecs, paths

STAGE = "index"
IO = StageIO(reads=(paths.REFITTED.weights, paths.REFITTED.meta), writes=(paths.INDEX, paths.INDEX_INFO))
RECALL_K = 10
MAX_EF_SEARCH = 4096  # HNSW beyond this is slower than a flat scan of any catalog we'd serve
_IVF_MIN_POINTS_PER_LIST = 39  # below this FAISS k-means warns and centroids are noise


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
    # IVF over HNSW: at equal recall on user queries IVF searched faster and built an order of
    # magnitude faster on inner-product vectors (benchmarks/serving --index-kind compares them).
    return "flat" if n_items <= cfg.exact_max_items else "ivf"


def ivf_nlist(n_items: int, cfg: IndexConfig) -> int:
    """~4*sqrt(n) lists, but never so many that k-means has < 39 points per centroid."""
    want = cfg.ivf_nlist or round(4 * math.sqrt(n_items))
    return int(max(1, min(want, n_items // _IVF_MIN_POINTS_PER_LIST, n_items)))


def _exact_kth(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """The k-th largest exact score of each query (the recall threshold)."""
    n = len(x)
    out = np.empty(len(q), dtype=np.float32)
    step = max(1, SCORE_CHUNK // n)
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


def _construct(x: np.ndarray, kind: str, cfg: IndexConfig) -> tuple[Any, dict[str, Any], int, int]:
    """(index with x added, params, starting knob, widest knob). Single-threaded: HNSW's
    parallel insertion order is unspecified, so only a 1-thread build gives the same bytes
    (and so the same content-addressed release) for the same vectors."""
    import faiss

    n, d = x.shape
    with _omp_threads(1):
        if kind == "flat":
            flat = faiss.IndexFlatIP(d)
            flat.add(x)
            return flat, {}, 0, 0
        if kind == "hnsw":
            # level assignment uses FAISS's fixed seed (not settable from Python)
            hnsw = faiss.IndexHNSWFlat(d, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            hnsw.hnsw.efConstruction = cfg.hnsw_ef_construction
            hnsw.add(x)
            params = {"m": cfg.hnsw_m, "ef_construction": cfg.hnsw_ef_construction}
            return hnsw, params, cfg.hnsw_ef_search, max(cfg.hnsw_ef_search, MAX_EF_SEARCH)
        if kind == "ivf":
            nlist = ivf_nlist(n, cfg)
            quantizer = faiss.IndexFlatIP(d)
            ivf = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
            ivf.cp.seed = cfg.seed
            ivf.train(x)
            ivf.add(x)
            return ivf, {"nlist": nlist}, min(cfg.ivf_nprobe, nlist), nlist
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
            knob_value(index, kind, knob)
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


def self_check(index, item_vectors: np.ndarray, k: int = 10, probes: int = 64, seed: int = 0) -> float:
    """recall@k of the index against exact numpy search on a sample of item queries."""
    x = np.ascontiguousarray(item_vectors, dtype=np.float32)
    rng = np.random.default_rng(seed)
    q = x[rng.choice(len(x), size=min(probes, len(x)), replace=False)]
    k = min(k, len(x))
    return _recall(index, x, q, _exact_kth(x, q, k), k)


# -------------------------------------------------------------------------------- stage


def index(ctx: RunContext) -> dict[str, Any]:
    log = ctx.logger(STAGE)
    import faiss

    cfg = ctx.config.index
    faiss.omp_set_num_threads(max(1, min(4, faiss.omp_get_max_threads())))
    model = read_model(ctx, paths.REFITTED)
    if registry.scoring(model.kind) == "item_item":
        return _item_item(ctx, cast(ItemItem, model))
    vectors_ = cast(DotProduct, model).item_vectors()
    users = cast(DotProduct, model).user_vectors()
    rng = np.random.default_rng(cfg.seed)
    users = users[np.sort(rng.choice(len(users), size=min(cfg.recall_probes, len(users)), replace=False))]
    try:
        idx, info = build_index(vectors_, cfg, queries=users)
    except IndexQualityError as exc:
        raise ctx.error(STAGE, f"index not published: {exc}") from exc
    ctx.write(paths.INDEX, serialize(idx))
    # the manifest records it; serving re-applies the knob. No timings: a rerun writes the same bytes
    ctx.write(paths.INDEX_INFO, codecs.json_bytes({k: v for k, v in info.items() if k != "build_seconds"}))
    result = {**info, "uri": ctx.uri(paths.INDEX)}
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


def _item_item(ctx: RunContext, model: ItemItem) -> dict[str, Any]:
    """No ANN index for an item-item model: check S and record its size (publish ships S itself)."""
    S = model.similarity()
    n = S.shape[0]
    if S.shape != (n, n) or n == 0 or not np.isfinite(S.data).all():
        raise ctx.error(STAGE, f"similarity matrix of shape {S.shape} is not a finite square matrix over the items")
    ctx.delete(paths.INDEX)
    per_row = np.diff(S.indptr)
    info = {
        "kind": "item_item",
        "items": int(n),
        "nnz": int(S.nnz),
        "max_neighbours": int(per_row.max()),
        "bytes": 8 * (n + 1) + 8 * int(S.nnz),  # as released: int64 indptr, int32 indices, float32 values
    }
    ctx.write(paths.INDEX_INFO, codecs.json_bytes(info))
    ctx.logger(STAGE).info(
        "index: item-item model, no vector index; S has %d items, %d entries (at most %d per item, %.1f MB)",
        n,
        info["nnz"],
        info["max_neighbours"],
        info["bytes"] / 1e6,
    )
    return ctx.write_result(STAGE, info)
