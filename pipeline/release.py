"""Releases: immutable folders of everything serving needs, plus the tenant's pointer.

`tenants/{t}/releases/{release_id}/` holds the files below and `manifest.json` (written last,
with the sha256 of every file). `tenants/{t}/current.json` names the live release and is
written after the manifest, with a conditional put so concurrent publishers cannot both win
and the pointer never moves to an older data interval. Readers verify every checksum before
using a byte.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from pipeline.storage import ObjectStore, PreconditionFailed, codecs, paths

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FILES = (
    "model.safetensors",
    "model.json",
    "user_vectors.npy",
    "item_vectors.npy",
    "users.parquet",
    "items.parquet",
    "seen_indptr.npy",
    "seen_indices.npy",
    "popular.npy",
    "items.faiss",
)


class ReleaseError(RuntimeError):
    """A release is missing, incomplete or fails its checksums; it must not be served."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def release_id_for(run_id: str, files: dict[str, bytes]) -> str:
    """Deterministic id: the run plus a digest of the content. Same inputs -> same release."""
    digest = hashlib.sha256("".join(f"{n}:{sha256(b)}\n" for n, b in sorted(files.items())).encode())
    return f"{run_id}-{digest.hexdigest()[:10]}"


@dataclass
class Pointer:
    release_id: str
    data_interval_end: str
    previous_release_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        return codecs.json_bytes(
            {
                "release_id": self.release_id,
                "data_interval_end": self.data_interval_end,
                "previous_release_id": self.previous_release_id,
                **self.extra,
            }
        )


def read_pointer(store: ObjectStore, tenant: str) -> tuple[dict[str, Any], str] | None:
    """The pointer document and its etag, or None when the tenant has never published."""
    got = store.get_with_etag(paths.pointer_key(tenant))
    if got is None:
        return None
    return json.loads(got[0]), got[1]


def flip_pointer(
    store: ObjectStore, tenant: str, pointer: Pointer, *, allow_backwards: bool = False
) -> tuple[bool, str]:
    """Point the tenant at `pointer.release_id`. Returns (moved, reason).

    Never moves to an older data interval unless allow_backwards (rollback); a concurrent
    writer makes the conditional put fail (PreconditionFailed), never a silent overwrite.
    """
    current = read_pointer(store, tenant)
    etag = None
    if current is not None:
        doc, etag = current
        if doc["release_id"] == pointer.release_id:
            return False, f"already live: {pointer.release_id}"
        if not allow_backwards and doc["data_interval_end"] > pointer.data_interval_end:
            return False, (
                f"live release {doc['release_id']} covers data up to {doc['data_interval_end']}, "
                f"newer than {pointer.data_interval_end}: pointer not moved backwards"
            )
        pointer.previous_release_id = doc["release_id"]
    store.put_if(paths.pointer_key(tenant), pointer.to_bytes(), etag=etag)
    return True, f"live: {pointer.release_id}"


def write_release(
    store: ObjectStore, tenant: str, release_id: str, files: dict[str, bytes], manifest: dict[str, Any]
) -> bool:
    """Write files, then the manifest. Returns False when this exact release already exists."""
    mkey = paths.release_key(tenant, release_id, MANIFEST)
    checks = {name: {"sha256": sha256(data), "bytes": len(data)} for name, data in sorted(files.items())}
    if store.exists(mkey):
        existing = json.loads(store.get(mkey))
        if existing.get("files") != checks:
            raise ReleaseError(f"release {tenant}/{release_id} exists with different content: releases are immutable")
        return False
    for name, data in files.items():
        store.put(paths.release_key(tenant, release_id, name), data)
    store.put(mkey, codecs.json_bytes({**manifest, "release_id": release_id, "tenant": tenant, "files": checks}))
    return True


def read_manifest(store: ObjectStore, tenant: str, release_id: str) -> dict[str, Any]:
    try:
        return json.loads(store.get(paths.release_key(tenant, release_id, MANIFEST)))
    except FileNotFoundError:
        raise ReleaseError(f"release {tenant}/{release_id} has no manifest (incomplete or missing)") from None


def read_file(store: ObjectStore, tenant: str, release_id: str, name: str, manifest: dict[str, Any]) -> bytes:
    """One release file, refused unless its sha256 matches the manifest."""
    expected = manifest["files"].get(name)
    if expected is None:
        raise ReleaseError(f"release {tenant}/{release_id}: {name} is not in the manifest")
    data = store.get(paths.release_key(tenant, release_id, name))
    if sha256(data) != expected["sha256"]:
        log.error("checksum mismatch: release %s/%s file %s", tenant, release_id, name)
        raise ReleaseError(f"release {tenant}/{release_id}: checksum mismatch on {name}; refusing to load")
    return data


@dataclass(frozen=True)
class Release:
    """A verified, fully loaded release: what scoring needs, in memory, immutable."""

    tenant: str
    release_id: str
    manifest: dict[str, Any]
    user_ids: pd.Index
    item_ids: pd.Index
    user_vectors: np.ndarray
    item_vectors: np.ndarray
    seen_indptr: np.ndarray
    seen_indices: np.ndarray
    popular: np.ndarray
    item_popularity: np.ndarray
    index_bytes: bytes

    def seen(self, user_row: int) -> np.ndarray:
        return self.seen_indices[self.seen_indptr[user_row] : self.seen_indptr[user_row + 1]]


def load_release(store: ObjectStore, tenant: str, release_id: str) -> Release:
    manifest = read_manifest(store, tenant, release_id)
    get = lambda name: read_file(store, tenant, release_id, name, manifest)  # noqa: E731
    users = codecs.read_parquet(get("users.parquet"))
    items = codecs.read_parquet(get("items.parquet"))
    return Release(
        tenant=tenant,
        release_id=release_id,
        manifest=manifest,
        user_ids=pd.Index(users["user_id"].astype(str).to_numpy(), dtype=object),
        item_ids=pd.Index(items["item_id"].astype(str).to_numpy(), dtype=object),
        user_vectors=codecs.read_npy(get("user_vectors.npy")).astype(np.float32, copy=False),
        item_vectors=codecs.read_npy(get("item_vectors.npy")).astype(np.float32, copy=False),
        seen_indptr=codecs.read_npy(get("seen_indptr.npy")),
        seen_indices=codecs.read_npy(get("seen_indices.npy")),
        popular=codecs.read_npy(get("popular.npy")),
        item_popularity=items["n_users"].to_numpy(dtype=np.float64),
        index_bytes=get("items.faiss"),
    )


def list_releases(store: ObjectStore, tenant: str) -> list[str]:
    prefix = paths.releases_prefix(tenant) + "/"
    return sorted({k[len(prefix) :].split("/", 1)[0] for k in store.list(prefix) if k.endswith("/" + MANIFEST)})


def try_flip(store: ObjectStore, tenant: str, pointer: Pointer, allow_backwards: bool = False) -> tuple[bool, str]:
    try:
        return flip_pointer(store, tenant, pointer, allow_backwards=allow_backwards)
    except PreconditionFailed as exc:
        return False, f"another publisher moved the pointer first ({exc})"
