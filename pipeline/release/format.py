"""Releases: immutable folders of everything serving needs, plus the tenant's pointer.

`tenants/{t}/releases/{release_id}/` holds the files below and `manifest.json` (written last,
with the sha256 of every file). `tenants/{t}/current.json` names the live release and is
written after the manifest, with a conditional put, in the release order of pointer.py (newer
intervals only, first of an interval wins, pins and blocklist honoured). Readers verify every
checksum before using a byte (the decoded, in-memory `Release` is pipeline/release/loaded.py).

`write_release` is the only code that writes a release folder and `publish_release` (write,
verify as serving loads it, then flip) the only one that publishes: the publish stage, tests
and benchmarks all call them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from safetensors.numpy import save as st_save

from pipeline.models.registry import Scoring
from pipeline.release.loaded import OPTIONAL_FILES as OPTIONAL_FILES  # re-exported beside FILES (decode reads them)
from pipeline.release.loaded import Release, ReleaseError, decode, index_mismatch
from pipeline.release.pointer import Flip as Flip  # the pointer lives in pointer.py; re-exported for callers
from pipeline.release.pointer import FlipOutcome as FlipOutcome
from pipeline.release.pointer import Pointer as Pointer
from pipeline.release.pointer import flip_pointer as flip_pointer
from pipeline.release.pointer import read_pointer as read_pointer
from pipeline.release.pointer import refusal
from pipeline.storage import ObjectStore, codecs, paths

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = 1  # the manifest's "format": bump when readers must tell old releases from new
# The required files are a function of how the model scores (registry.scoring): a dot-product
# release carries vectors and their FAISS index, an item-item release the CSR arrays of S.
FILES = (  # a dot-product release
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
SIMILARITY_FILES = ("similarity_indptr.npy", "similarity_indices.npy", "similarity_data.npy")
ITEM_ITEM_FILES = (
    *(f for f in FILES if f not in ("user_vectors.npy", "item_vectors.npy", "items.faiss")),
    *SIMILARITY_FILES,
)


def required_files(scoring: Scoring) -> tuple[str, ...]:
    return FILES if scoring == "dot" else ITEM_ITEM_FILES


def scoring_of(manifest: dict[str, Any]) -> Scoring:
    """How a written release scores, from its files (load_release checks model.json agrees)."""
    return "item_item" if SIMILARITY_FILES[0] in manifest["files"] else "dot"


@dataclass(frozen=True)
class VectorScoring:
    """What scores a dot-product release: user and item vectors, and the FAISS index over the items."""

    user_vectors: np.ndarray
    item_vectors: np.ndarray
    index_bytes: bytes


@dataclass(frozen=True)
class SimilarityScoring:
    """What scores an item-item release: S (float32 CSR, items x items); users come with their seen lists."""

    similarity: sp.csr_matrix


def _scoring_files(scores: VectorScoring | SimilarityScoring) -> dict[str, bytes]:
    if isinstance(scores, VectorScoring):
        return {
            "user_vectors.npy": codecs.npy_bytes(np.asarray(scores.user_vectors, dtype=np.float32)),
            "item_vectors.npy": codecs.npy_bytes(np.asarray(scores.item_vectors, dtype=np.float32)),
            "items.faiss": scores.index_bytes,
        }
    S = sp.csr_matrix(scores.similarity, dtype=np.float32)
    S.sort_indices()
    return {
        "similarity_indptr.npy": codecs.npy_bytes(S.indptr.astype(np.int64)),
        "similarity_indices.npy": codecs.npy_bytes(S.indices.astype(np.int32)),
        "similarity_data.npy": codecs.npy_bytes(S.data),
    }


def assemble_files(
    *,
    model_state: dict[str, np.ndarray],
    model_kind: str,
    model_json: bytes,
    scores: VectorScoring | SimilarityScoring,
    users: pd.DataFrame,
    items: pd.DataFrame,
    seen_indptr: np.ndarray,
    seen_indices: np.ndarray,
    popular_items: int,
) -> dict[str, bytes]:
    """The required files of a release (`required_files`, in order): publish, tests and benchmarks
    all build releases here, so a format change cannot leave one of them writing the old one.

    users: user_id, user_idx; items: item_id, item_idx (n_users is derived from the seen
    lists, and so is the popularity list: most distinct users first, ties by item index).
    """
    n_items = len(items)
    n_users_per_item = np.bincount(seen_indices, minlength=n_items)
    popular = np.lexsort((np.arange(n_items), -n_users_per_item))[:popular_items].astype(np.int32)
    items = items[["item_id", "item_idx"]].assign(n_users=n_users_per_item.astype(np.int64))
    parts = {
        "model.safetensors": st_save(model_state, metadata={"kind": model_kind}),
        "model.json": model_json,
        "users.parquet": codecs.parquet_bytes(users[["user_id", "user_idx"]]),
        "items.parquet": codecs.parquet_bytes(items),
        "seen_indptr.npy": codecs.npy_bytes(seen_indptr),
        "seen_indices.npy": codecs.npy_bytes(seen_indices),
        "popular.npy": codecs.npy_bytes(popular),
        **_scoring_files(scores),
    }
    layout = required_files("dot" if isinstance(scores, VectorScoring) else "item_item")
    assert set(parts) == set(layout)
    return {name: parts[name] for name in layout}


def files_from_vectors(
    user_ids: Sequence[str],
    item_ids: Sequence[str],
    user_vectors: np.ndarray,
    item_vectors: np.ndarray,
    seen_indptr: np.ndarray,
    seen_indices: np.ndarray,
    *,
    index_bytes: bytes,
    model_meta: dict[str, Any],
    popular_items: int = 100,
) -> dict[str, bytes]:
    """`assemble_files` for a release from arrays alone (tests, benchmarks): the model's state is
    its two factor tables, model.json is `model_meta` (with its "kind"), rows are in id order."""
    return assemble_files(
        model_state={"user_factors": user_vectors, "item_factors": item_vectors},
        model_kind=model_meta["kind"],
        model_json=codecs.json_bytes(model_meta),
        scores=VectorScoring(user_vectors, item_vectors, index_bytes),
        users=_id_frame("user", user_ids),
        items=_id_frame("item", item_ids),
        seen_indptr=seen_indptr,
        seen_indices=seen_indices,
        popular_items=popular_items,
    )


def files_from_similarity(
    user_ids: Sequence[str],
    item_ids: Sequence[str],
    similarity: sp.csr_matrix,
    seen_indptr: np.ndarray,
    seen_indices: np.ndarray,
    *,
    model_meta: dict[str, Any],
    popular_items: int = 100,
) -> dict[str, bytes]:
    """`files_from_vectors` for an item-item release: the model's state is S's CSR arrays."""
    S = sp.csr_matrix(similarity, dtype=np.float32)
    return assemble_files(
        model_state={"similarity_indptr": S.indptr, "similarity_indices": S.indices, "similarity_data": S.data},
        model_kind=model_meta["kind"],
        model_json=codecs.json_bytes(model_meta),
        scores=SimilarityScoring(S),
        users=_id_frame("user", user_ids),
        items=_id_frame("item", item_ids),
        seen_indptr=seen_indptr,
        seen_indices=seen_indices,
        popular_items=popular_items,
    )


def _id_frame(kind: str, ids: Sequence[str]) -> pd.DataFrame:
    """{kind}_id, {kind}_idx (int32, as the features stage writes them), in the order given."""
    idx = np.arange(len(ids), dtype=np.int32)
    return pd.DataFrame({f"{kind}_id": pd.array(ids, dtype="string"), f"{kind}_idx": idx})


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def release_id_for(run_id: str, files: dict[str, bytes]) -> str:
    """Deterministic id: the run plus a digest of the content. Same inputs -> same release."""
    digest = hashlib.sha256("".join(f"{n}:{sha256(b)}\n" for n, b in sorted(files.items())).encode())
    return f"{run_id}-{digest.hexdigest()[:10]}"


def write_release(
    store: ObjectStore, tenant: str, release_id: str, files: dict[str, bytes], manifest: dict[str, Any]
) -> bool:
    """Write files, then the manifest (`manifest` plus format, ids and every file's sha256).

    The only code that writes a release folder. Returns False when this exact release already exists.
    """
    mkey = paths.release_key(tenant, release_id, MANIFEST)
    checks = {name: {"sha256": sha256(data), "bytes": len(data)} for name, data in sorted(files.items())}
    if store.exists(mkey):
        existing = json.loads(store.get(mkey))
        if existing.get("files") != checks:
            raise ReleaseError(f"release {tenant}/{release_id} exists with different content: releases are immutable")
        return False
    if mismatch := index_mismatch(files):  # an index built from other vectors: refused before any byte is written
        raise ReleaseError(f"release {tenant}/{release_id}: {mismatch}; refusing to write a mismatched index")
    for name, data in files.items():
        store.put(paths.release_key(tenant, release_id, name), data)
    doc = {**manifest, "format": FORMAT, "release_id": release_id, "tenant": tenant, "files": checks}
    store.put(mkey, codecs.json_bytes(doc))
    return True


@dataclass(frozen=True)
class Published:
    release_id: str
    written: bool  # False: this exact release was already there (a rerun)
    flip: Flip
    verified: dict[str, Any] = field(default_factory=dict)  # verify_release's counts; empty when not flipped


def publish_release(
    store: ObjectStore,
    tenant: str,
    files: dict[str, bytes],
    manifest: dict[str, Any],
    *,
    pointer_extra: dict[str, Any] | None = None,
    retries: int = 1,
    verify: bool = True,
) -> Published:
    """Write the release (id from manifest["run_id"] and the content), verify it, then flip the pointer to it.

    `manifest` must name the run and its `data_interval_end` (the pointer orders releases by
    it, pointer.py). A release the order refuses (older, same interval, pinned tenant,
    blocklisted, already live) is written but not verified and not flipped. Otherwise it is
    read back, loaded as serving loads it and smoke-queried (verify.py; `verify=False` only
    for tests of the pointer alone, with fake bytes); a failure raises ReleaseError and the
    pointer stays (a rerun re-uploads files whose stored bytes are not the manifest's).
    A lost race is retried `retries` times: the winner may hold an older interval, and the
    pointer must not stay behind it; a winner of this interval or a newer one makes the
    retry SAME_INTERVAL / OLDER_THAN_LIVE.
    """
    release_id = release_id_for(manifest["run_id"], files)
    written = write_release(store, tenant, release_id, files, manifest)
    live = read_pointer(store, tenant)
    refused = refusal(store, tenant, live[0] if live else None, release_id, manifest["data_interval_end"])
    if refused is not None:
        return Published(release_id, written, refused)
    checks: dict[str, Any] = {}
    if verify:
        from pipeline.release import verify as verifier  # imports this module: a call-time import

        try:
            checks = verifier.verify_release(store, tenant, release_id, files)
        except ReleaseError:
            # an earlier attempt's damaged upload (this one wrote nothing): put back the bytes
            # the manifest promises, then verify again; damage from this very upload is raised
            repaired = [] if written else verifier.repair(store, tenant, release_id, files)
            if not repaired:
                raise
            checks = {**verifier.verify_release(store, tenant, release_id, files), "repaired": repaired}
    pointer = Pointer(release_id, manifest["data_interval_end"], extra=dict(pointer_extra or {}))
    flip = flip_pointer(store, tenant, pointer)
    for _ in range(retries):
        if flip.outcome is not FlipOutcome.LOST_RACE:
            break
        flip = flip_pointer(store, tenant, pointer)
    return Published(release_id, written, flip, checks)


def read_manifest(store: ObjectStore, tenant: str, release_id: str) -> dict[str, Any]:
    try:
        data = store.get(paths.release_key(tenant, release_id, MANIFEST))
    except FileNotFoundError:
        raise ReleaseError(f"release {tenant}/{release_id} has no manifest (incomplete or missing)") from None
    try:  # a damaged manifest is a ReleaseError like a damaged file, not a stray JSON/KeyError
        manifest = json.loads(data)
        ok = all(isinstance(f["sha256"], str) for f in manifest["files"].values())
    except (ValueError, TypeError, KeyError, AttributeError):
        ok = False
    if not ok:
        raise ReleaseError(
            f"release {tenant}/{release_id}: damaged manifest (not JSON or no checksums); refusing to load"
        )
    return manifest


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


def load_release(store: ObjectStore, tenant: str, release_id: str) -> Release:
    manifest = read_manifest(store, tenant, release_id)
    if manifest.get("tenant") != tenant or manifest.get("release_id") != release_id:
        raise ReleaseError(
            f"release {tenant}/{release_id}: manifest names {manifest.get('tenant')}/{manifest.get('release_id')}; "
            "refusing to serve another tenant's or release's files"
        )
    get = lambda name: read_file(store, tenant, release_id, name, manifest)  # noqa: E731
    scoring = scoring_of(manifest)
    for name in required_files(scoring):  # a release is whole or refused, weights included
        if name not in manifest["files"]:
            raise ReleaseError(f"release {tenant}/{release_id}: {name} is not in the manifest")
    get("model.safetensors")  # serving does not use the weights, but they must be intact
    try:
        return decode(tenant, release_id, manifest, scoring, get)
    except ReleaseError:
        raise
    except Exception as exc:  # e.g. an .npy that needs pickle: never loaded with allow_pickle
        raise ReleaseError(f"release {tenant}/{release_id}: unreadable content ({type(exc).__name__}: {exc})") from exc


def list_releases(store: ObjectStore, tenant: str) -> list[str]:
    prefix = paths.releases_prefix(tenant) + "/"
    return sorted({k[len(prefix) :].split("/", 1)[0] for k in store.list(prefix) if k.endswith("/" + MANIFEST)})
