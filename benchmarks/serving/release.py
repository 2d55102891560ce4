"""The benchmark's synthetic release, written and loaded with the product's own code."""

from __future__ import annotations

import time

from benchmarks.serving import INTERVAL_END, TENANT


def _index_bytes(item_vectors, user_vectors, kind: str | None):
    """FAISS index bytes and info, built and tuned the way the index stage builds them."""
    import numpy as np

    from pipeline.config.tenant import IndexConfig
    from pipeline.index import build as faiss_index
    from pipeline.index import search as ann

    rng = np.random.default_rng(0)
    probes = user_vectors[np.sort(rng.choice(len(user_vectors), size=min(256, len(user_vectors)), replace=False))]
    built, info = faiss_index.build_index(item_vectors, IndexConfig(kind=kind or "auto"), queries=probes)
    return ann.serialize(built), info


def synthetic_files(
    n_items: int, dim: int, n_users: int, index_kind: str | None = None, seed: int = 0, with_candidates: bool = True
):
    """The files of a release, through the release writer's own assembly, from synthetic data
    (with each user's precomputed candidates, as publish writes them, unless with_candidates=False)."""
    import numpy as np
    import scipy.sparse as sp

    from pipeline.release import format as release

    rng = np.random.default_rng(seed)
    # clustered unit-ish vectors, roughly what an ALS model gives
    centers = rng.normal(size=(256, dim)).astype(np.float32)
    item_vectors = (centers[rng.integers(0, 256, n_items)] + 0.5 * rng.normal(size=(n_items, dim))).astype(np.float32)
    item_vectors /= np.linalg.norm(item_vectors, axis=1, keepdims=True)
    user_vectors = (centers[rng.integers(0, 256, n_users)] + 0.5 * rng.normal(size=(n_users, dim))).astype(np.float32)
    user_vectors *= 0.1 / np.linalg.norm(user_vectors, axis=1, keepdims=True)

    # long-tail seen lists: lognormal lengths (median ~20), capped; items drawn Zipf-like
    lengths = np.clip(rng.lognormal(mean=3.0, sigma=1.1, size=n_users), 1, 2_000).astype(np.int64)
    item_p = 1.0 / np.arange(1, n_items + 1) ** 0.8
    item_p /= item_p.sum()
    perm = rng.permutation(n_items)  # popular items are not simply the first rows
    rows = np.repeat(np.arange(n_users), lengths)
    cols = perm[rng.choice(n_items, size=len(rows), p=item_p)]
    seen = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(n_users, n_items))
    seen.sum_duplicates()
    seen.sort_indices()
    indptr, indices = seen.indptr.astype(np.int64), seen.indices.astype(np.int32)

    index_bytes, index_info = _index_bytes(item_vectors, user_vectors, index_kind)
    files = release.files_from_vectors(
        [f"u{u}" for u in range(n_users)],
        [f"i{i}" for i in range(n_items)],
        user_vectors,
        item_vectors,
        indptr,
        indices,
        index_bytes=index_bytes,
        model_meta={"kind": "als", "config": {"factors": dim, "synthetic": True}, "users": n_users, "items": n_items},
        popular_items=200,
    )
    cand_s = neighbors_s = None
    if with_candidates:
        from pipeline.release import candidates

        started = time.perf_counter()
        files[candidates.FILE] = candidates.file_bytes(
            index_bytes, index_info, item_vectors, user_vectors, indptr, indices
        )
        cand_s = round(time.perf_counter() - started, 1)
        started = time.perf_counter()
        files[candidates.NEIGHBORS_FILE] = candidates.neighbors_bytes(index_bytes, index_info, item_vectors)
        neighbors_s = round(time.perf_counter() - started, 1)
    lens = np.diff(indptr)
    stats = {
        "seen_per_user": {
            "mean": round(float(lens.mean()), 1),
            "p50": int(np.percentile(lens, 50)),
            "p99": int(np.percentile(lens, 99)),
            "max": int(lens.max()),
            "users_with_100_plus": int((lens >= 100).sum()),
        },
        "index": index_info,
        "candidates_per_user": 100 if with_candidates else None,
        "candidates_seconds": cand_s,
        "neighbors_seconds": neighbors_s,
    }
    return files, stats


def publish_synthetic(
    artifact_root: str, n_items: int, dim: int, n_users: int, index_kind: str | None = None, with_candidates=True
) -> tuple[str, dict]:
    from pipeline.release import format as release
    from pipeline.storage import open_store

    files, stats = synthetic_files(n_items, dim, n_users, index_kind, with_candidates=with_candidates)
    manifest = {
        "created_at": INTERVAL_END,
        "data_interval_end": INTERVAL_END,
        "run_id": "20260101T000000Z",
        "users": n_users,
        "items": n_items,
        "dim": dim,
        "model": "als",
        "index": stats["index"],  # what serving's deserialize re-applies (kind, tuned efSearch/nprobe)
        "benchmark": "synthetic (benchmarks/serving/release.py)",
    }
    out = release.publish_release(open_store(artifact_root), TENANT, files, manifest, pointer_extra={"model": "als"})
    if not out.flip.moved:
        raise RuntimeError(f"could not point {TENANT} at {out.release_id}: {out.flip.reason}")
    stats["release_bytes"] = int(sum(len(b) for b in files.values()))
    return out.release_id, stats


def load_into_redis(artifact_root: str, release_id: str, redis_url: str, prefix: str, tenant: str = TENANT) -> dict:
    """The release's users, seen lists and online features into Redis under `prefix`, with the
    refresh stage's own writer and pointer flip."""
    from pipeline.release import format as release
    from pipeline.release import refresh
    from pipeline.storage import open_store
    from pipeline.storage.redis import redis_client

    rel = release.load_release(open_store(artifact_root), tenant, release_id)
    r = redis_client(redis_url)
    try:
        started = time.perf_counter()
        written = refresh.write_release(r, prefix, rel)
        flipped, _ = refresh.flip(r, prefix, tenant, release_id, grace_seconds=3600)
        if not flipped:
            raise RuntimeError("Redis pointer did not flip")
        return {"payload_bytes": written, "seconds": round(time.perf_counter() - started, 1)}
    finally:
        r.close()


def publish_without_ranker(src_root: str, dst_root: str, tenant: str, release_id: str) -> str:
    """Publish `release_id` again under `dst_root` without its second stage (ranker.safetensors,
    twostage.*): the same release as serving sees it when the gate chose one stage; its id."""
    from pipeline.release import format as release
    from pipeline.release.loaded import OPTIONAL_FILES
    from pipeline.storage import open_store

    second_stage = [n for n in OPTIONAL_FILES if n == "ranker.safetensors" or n.startswith("twostage.")]
    src = open_store(src_root)
    manifest = release.read_manifest(src, tenant, release_id)
    if "ranker.safetensors" not in manifest["files"]:
        raise RuntimeError(f"release {tenant}/{release_id} has no ranker.safetensors: not a two-stage release")
    files = {
        name: release.read_file(src, tenant, release_id, name, manifest)
        for name in manifest["files"]
        if name not in second_stage
    }
    kept = {k: v for k, v in manifest.items() if k not in ("format", "release_id", "tenant", "files")}
    pointer = release.read_pointer(src, tenant)
    extra = {k: v for k, v in (pointer[0] if pointer else {}).items() if k in ("model", "run_id")}
    out = release.publish_release(
        open_store(dst_root), tenant, files, {**kept, "two_stage": False, "without_ranker_of": release_id},
        pointer_extra=extra,
    )  # fmt: skip
    if not out.flip.moved:
        raise RuntimeError(f"could not point {tenant} at {out.release_id}: {out.flip.reason}")
    return out.release_id


def delete_redis_keys(redis_url: str, prefix: str) -> int:
    from pipeline.storage.redis import redis_client

    r = redis_client(redis_url)
    deleted = 0
    try:
        batch = []
        for k in r.scan_iter(match=f"{prefix}:*", count=5000):
            batch.append(k)
            if len(batch) >= 5000:
                deleted += r.unlink(*batch)
                batch = []
        if batch:
            deleted += r.unlink(*batch)
    finally:
        r.close()
    return deleted
