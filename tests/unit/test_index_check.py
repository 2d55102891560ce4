"""A release's FAISS index must hold exactly its items, in their dimension (write and load)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.config.tenant import IndexConfig
from pipeline.index import build as faiss_index
from pipeline.index import search as ann
from pipeline.release import format as release
from pipeline.release.loaded import ReleaseError, index_shape
from pipeline.storage import LocalStore, paths


def files(n_items: int = 30, dim: int = 8, index_items: int | None = None, index_dim: int | None = None):
    rng = np.random.default_rng(0)
    items = rng.standard_normal((n_items, dim)).astype(np.float32)
    other = rng.standard_normal((index_items or n_items, index_dim or dim)).astype(np.float32)
    indptr = np.arange(0, 41, 2, dtype=np.int64)  # 20 users, 2 items each
    return release.files_from_vectors(
        [f"u{i}" for i in range(20)],
        [f"i{j}" for j in range(n_items)],
        rng.standard_normal((20, dim)).astype(np.float32),
        items,
        indptr,
        rng.integers(0, n_items, 40).astype(np.int32),
        index_bytes=ann.serialize(faiss_index.build_index(other)[0]),
        model_meta={"kind": "test"},
    )


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_index_shape_reads_the_header_of_every_kind_we_build(kind):
    x = np.random.default_rng(1).standard_normal((400, 12)).astype(np.float32)
    cfg = IndexConfig(kind=kind, min_recall=0.5) if kind != "flat" else None
    idx = faiss_index.build_index(x, cfg)[0]
    assert index_shape(ann.serialize(idx)) == (12, 400)


@pytest.mark.parametrize(("index_items", "index_dim"), [(29, None), (None, 4)])
def test_a_mismatched_index_is_refused_at_write(tmp_path, index_items, index_dim):
    bad = files(index_items=index_items, index_dim=index_dim)
    with pytest.raises(ReleaseError, match=r"release acme/r-1: items.faiss holds \d+ vectors of dimension \d+"):
        release.write_release(LocalStore(tmp_path), "acme", "r-1", bad, {"run_id": "r"})
    assert not LocalStore(tmp_path).list("tenants/")  # nothing written


def test_a_mismatched_index_is_refused_at_load(tmp_path):
    """An index swapped in with a valid manifest (a second copy of the run wrote it): load refuses."""
    store = LocalStore(tmp_path)
    good = files()
    rid = "20260101T000000Z-0000000001"
    release.write_release(store, "acme", rid, good, {"run_id": "20260101T000000Z"})
    assert release.load_release(store, "acme", rid).release_id == rid
    swapped = files(index_items=31)["items.faiss"]
    store.put(paths.release_key("acme", rid, "items.faiss"), swapped)
    mkey = paths.release_key("acme", rid, release.MANIFEST)
    manifest = json.loads(store.get(mkey))
    manifest["files"]["items.faiss"] = {"sha256": release.sha256(swapped), "bytes": len(swapped)}
    store.put(mkey, json.dumps(manifest).encode())
    with pytest.raises(ReleaseError, match=rf"release acme/{rid}: items.faiss holds 31 vectors .* item_vectors.npy"):
        release.load_release(store, "acme", rid)
