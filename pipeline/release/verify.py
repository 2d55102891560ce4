"""Verify, then flip: a written release is read back, loaded as serving loads it and queried
before any pointer may name it.

`load_servable` is serving's load (checksummed `load_release`, then the FAISS index
deserialized with the manifest's tuned knob): publish checks exactly what serving will run.
`verify_release` adds what only the writer can know, that the bytes in the store are the
bytes it meant to upload, and a smoke query: a few users' top-k must be non-empty, with
finite scores and item ids of the release.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.index import search as ann
from pipeline.models import itemitem
from pipeline.release import format as release
from pipeline.release.loaded import Release, ReleaseError
from pipeline.storage import ObjectStore, paths

log = logging.getLogger(__name__)
SMOKE_USERS = 5  # users queried, spread over the release's user rows
SMOKE_K = 10


@dataclass(frozen=True)
class Servable:
    """A release as serving holds it: the verified in-memory release and its FAISS index."""

    release: Release
    index: Any | None  # faiss.Index; None for item-item releases (they sum rows of S)


def load_servable(store: ObjectStore, tenant: str, release_id: str) -> Servable:
    """Load, verify every checksum and deserialize the index: what serving does before a swap."""
    loaded = release.load_release(store, tenant, release_id)
    index = None
    if loaded.index_bytes is not None:
        try:
            index = ann.deserialize(loaded.index_bytes, loaded.manifest.get("index"))
        except Exception as exc:  # faiss raises RuntimeError with its own text
            raise ReleaseError(
                f"release {tenant}/{release_id}: items.faiss does not deserialize ({type(exc).__name__}: {exc})"
            ) from exc
    return Servable(loaded, index)


def smoke_query(servable: Servable, users: int = SMOKE_USERS, k: int = SMOKE_K) -> dict[str, Any]:
    """Top-k for a few users as serving scores them; raises ReleaseError naming what is wrong."""
    rel = servable.release
    where = f"release {rel.tenant}/{rel.release_id}"
    n_items, n_users = len(rel.item_ids), len(rel.user_ids)
    if n_items == 0:
        raise ReleaseError(f"{where}: no items")
    popular = np.asarray(rel.popular)
    if len(popular) == 0 or popular.min() < 0 or popular.max() >= n_items:
        raise ReleaseError(f"{where}: popular.npy is empty or names item rows outside 0..{n_items - 1}")
    rows = np.unique(np.linspace(0, max(n_users - 1, 0), min(users, n_users)).astype(np.int64))
    if not len(rows):
        return {"smoke_users": 0, "smoke_k": k}
    if rel.scoring == "dot":
        if servable.index is None:
            raise ReleaseError(f"{where}: a dot-product release without a FAISS index")
        ids, scores = ann.search(servable.index, rel.item_vectors, rel.user_vectors[rows], k)
    else:
        seen = itemitem.seen_matrix(rel.seen_indptr, rel.seen_indices, n_items)
        ids, scores = itemitem.top_k(itemitem.score_users(seen, rel.similarity, rows), k, rel.popularity_rank)
    valid = ids >= 0
    if not valid.any(axis=1).all():
        empty = [str(rel.user_ids[r]) for r in rows[~valid.any(axis=1)]]
        raise ReleaseError(f"{where}: smoke query: empty top-{k} for users {empty}")
    if (ids[valid] >= n_items).any():
        raise ReleaseError(f"{where}: smoke query: item rows outside 0..{n_items - 1}")
    if not np.isfinite(scores[valid]).all():
        bad = [str(rel.user_ids[r]) for r in rows[~np.isfinite(np.where(valid, scores, 0.0)).all(axis=1)]]
        raise ReleaseError(f"{where}: smoke query: non-finite scores for users {bad}")
    return {"smoke_users": len(rows), "smoke_k": k}


class _ReadBack:
    """The store, with the release files already read back and hashed served from memory, so
    `load_servable` decodes exactly the verified bytes without a second download."""

    def __init__(self, store: ObjectStore, fetched: dict[str, bytes]) -> None:
        self._store, self._fetched = store, fetched

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def get(self, key: str) -> bytes:
        return self._fetched[key] if key in self._fetched else self._store.get(key)


def verify_release(store: ObjectStore, tenant: str, release_id: str, files: dict[str, bytes]) -> dict[str, Any]:
    """Read back and hash every file against what was uploaded (`files`), load the release as
    serving does, run the smoke query. Raises ReleaseError naming tenant, release and file."""
    manifest = release.read_manifest(store, tenant, release_id)
    uploaded = {n: {"sha256": release.sha256(b), "bytes": len(b)} for n, b in files.items()}
    for name in sorted(set(uploaded) | set(manifest["files"])):
        if manifest["files"].get(name) != uploaded.get(name):
            raise ReleaseError(
                f"release {tenant}/{release_id}: manifest entry for {name} is not what was uploaded "
                f"({manifest['files'].get(name)} != {uploaded.get(name)})"
            )
    fetched: dict[str, bytes] = {}
    for name in manifest["files"]:  # read_file refuses bytes whose sha256 is not the manifest's
        fetched[paths.release_key(tenant, release_id, name)] = release.read_file(
            store, tenant, release_id, name, manifest
        )
    servable = load_servable(_ReadBack(store, fetched), tenant, release_id)
    return {"verified_files": len(fetched), **smoke_query(servable)}


def repair(store: ObjectStore, tenant: str, release_id: str, files: dict[str, bytes]) -> list[str]:
    """Re-upload the files whose stored bytes are missing or differ from `files` (whose sha256s
    the manifest holds: write_release checked); returns their names. Restores, never changes."""
    repaired = []
    for name, data in sorted(files.items()):
        k = paths.release_key(tenant, release_id, name)
        try:
            ok = release.sha256(store.get(k)) == release.sha256(data)
        except FileNotFoundError:
            ok = False
        if not ok:
            store.put(k, data)
            repaired.append(name)
    if repaired:
        log.warning("release %s/%s: re-uploaded damaged or missing %s", tenant, release_id, repaired)
    return repaired
