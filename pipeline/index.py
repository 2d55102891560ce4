"""index: a FAISS inner-product index over the published model's item vectors.

Exact (IndexFlatIP) search: ids are the release's item indices, so no id map is needed.
A self-check compares FAISS's answers with a plain matrix product before anything ships.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline import train
from pipeline.context import RunContext

STAGE = "index"
OUTPUT = "items.faiss"


def build_index(item_vectors: np.ndarray):
    import faiss

    x = np.ascontiguousarray(item_vectors, dtype=np.float32)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    return index


def serialize(index) -> bytes:
    import faiss

    return faiss.serialize_index(index).tobytes()


def deserialize(data: bytes):
    import faiss

    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))


def self_check(index, item_vectors: np.ndarray, k: int = 10, probes: int = 64, seed: int = 0) -> float:
    """recall@k of the index against exact numpy search on a sample of item queries."""
    rng = np.random.default_rng(seed)
    q = item_vectors[rng.choice(len(item_vectors), size=min(probes, len(item_vectors)), replace=False)]
    k = min(k, len(item_vectors))
    _, got = index.search(np.ascontiguousarray(q, dtype=np.float32), k)
    exact = np.argsort(-(q @ item_vectors.T), axis=1, kind="stable")[:, :k]
    scores = q @ item_vectors.T
    # ties make ids ambiguous; compare by score threshold instead of identity
    kth = np.take_along_axis(scores, exact[:, -1:], axis=1)
    ok = np.take_along_axis(scores, np.maximum(got, 0), axis=1) >= kth - 1e-4
    return float(ok.mean())


def index(ctx: RunContext) -> dict[str, Any]:
    log = ctx.logger(STAGE)
    import faiss

    faiss.omp_set_num_threads(max(1, min(4, faiss.omp_get_max_threads())))
    vectors = train.load_model(ctx, "refit").item_vectors()
    idx = build_index(vectors)
    recall = self_check(idx, vectors)
    if recall < 0.99:
        raise ctx.error(STAGE, f"exact FAISS index disagrees with numpy search (recall@10 {recall:.3f})")
    ctx.store.put(ctx.key(STAGE, OUTPUT), serialize(idx))
    result = {
        "kind": "flat_ip",
        "items": int(idx.ntotal),
        "dim": int(vectors.shape[1]),
        "recall_at_10_vs_exact": recall,
        "uri": ctx.store.uri(ctx.key(STAGE, OUTPUT)),
    }
    log.info(
        "index: FAISS IndexFlatIP, %d items x %d dims, self-check recall@10 %.3f",
        result["items"],
        result["dim"],
        recall,
    )
    return ctx.write_result(STAGE, result)
