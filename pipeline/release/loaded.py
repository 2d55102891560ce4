"""A loaded release: what scoring needs, in memory, decoded from bytes `format` has verified.

A release scores users one of two ways (pipeline/models/registry.py: `scoring`): "dot"
releases carry user and item vectors and a FAISS index; "item_item" releases (EASE,
item-kNN) carry the sparse item x item S instead, and score a user from their seen list.
In memory an item-item release has zero-width vectors, so the per-user data every store
keeps (a vector and a seen list) has one shape for both.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from pipeline.models import registry
from pipeline.models.itemitem import seen_matrix
from pipeline.models.registry import Scoring
from pipeline.models.sequence import SequenceEncoder
from pipeline.storage import codecs

# item_attributes: when the tenant has a catalog; user/item stats: releases since feature tables;
# candidates.npy / neighbors.npy: each user's top items and each item's nearest items of a
# dot-product release (pipeline/release/candidates.py)
# segment_popular.npy, segment_users.parquet: cold users' segment lists (release/segments.py)
# ranker.safetensors, twostage.*: a release whose gate chose two stages (pipeline/twostage/serve.py)
OPTIONAL_FILES = (
    "item_attributes.parquet",
    "user_stats.parquet",
    "item_stats.parquet",
    "candidates.npy",
    "neighbors.npy",
    "ranker.safetensors",
    "twostage.safetensors",
    "twostage.json",
    "segment_popular.npy",  # cold users' segment lists (release/segments.py)
    "segment_users.parquet",
)


class ReleaseError(RuntimeError):
    """A release is missing, incomplete or fails its checksums; it must not be served."""


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
    index_bytes: bytes | None  # the FAISS index (None for item-item releases: nothing to search)
    model_meta: dict[str, Any] = field(default_factory=dict)  # model.json: kind + config (fold-in needs it)
    item_category: np.ndarray | None = None  # int32 code per item, -1 = none
    categories: pd.Index = field(default_factory=lambda: pd.Index([], dtype=object))
    item_tags: sp.csr_matrix | None = None  # items x tags, True where the item has the tag
    tags: pd.Index = field(default_factory=lambda: pd.Index([], dtype=object))
    item_titles: np.ndarray | None = None  # object array of str/None, for human-readable reasons
    user_stats: pd.DataFrame | None = None  # feature_tables.user_features, one row per user_id
    similarity: sp.csr_matrix | None = None  # float32 items x items S of an item-item release
    candidates: np.ndarray | None = None  # int32 [n_users, C]: each user's top items at publish, -1 padded
    neighbors: np.ndarray | None = None  # int32 [n_items, C]: each item's nearest items at publish, -1 padded
    encoder: SequenceEncoder | None = None  # a "sequence" fold-in kind's (SASRec) encoder, from model.safetensors
    two_stage: Any = None  # twostage.serve.ServingTwoStage: the second stage serving applies, when shipped
    segment_popular: np.ndarray | None = None  # int32 [segments, P]: each user segment's popular items, -1 padded
    segment_of: pd.Series | None = None  # cold user id -> row of segment_popular (release/segments.py)

    @property
    def scoring(self) -> Scoring:
        return "dot" if self.similarity is None else "item_item"

    def seen(self, user_row: int) -> np.ndarray:
        """The user's distinct items, most recent first."""
        return self.seen_indices[self.seen_indptr[user_row] : self.seen_indptr[user_row + 1]]

    @cached_property
    def popularity_rank(self) -> np.ndarray:
        """Each item's place in the popularity order (most distinct users first, then index):
        how item-item rankings order equal scores, in serving and in the export alike."""
        pop = self.item_popularity
        rank = np.empty(len(pop), dtype=np.int64)
        rank[np.lexsort((np.arange(len(pop)), -pop))] = np.arange(len(pop))
        return rank

    def seen_matrix(self) -> sp.csr_matrix:
        """Binary users x items matrix of the seen lists (what an item-item release scores from)."""
        return seen_matrix(self.seen_indptr, self.seen_indices, len(self.item_ids))


def index_shape(data: bytes) -> tuple[int, int]:
    """(dim, ntotal) of a serialized FAISS index, read from its header without deserializing it.

    Every float index faiss writes (flat, IVF, HNSW, ID maps) starts with a 4-byte type code,
    then `d` (int32) and `ntotal` (int64): reading 16 bytes keeps the check free at any size.
    """
    if len(data) < 16:
        raise ValueError(f"{len(data)} bytes: too short for a FAISS index header")
    return int(np.frombuffer(data, dtype="<i4", count=1, offset=4)[0]), int(
        np.frombuffer(data, dtype="<i8", count=1, offset=8)[0]
    )


def check_index(tenant: str, release_id: str, index_bytes: bytes, item_vectors: np.ndarray) -> None:
    """The index must search exactly the release's items, in their dimension: an index built for
    another run's refit (a second copy of the run, a stale file) would return wrong item rows."""
    try:
        dim, ntotal = index_shape(index_bytes)
    except ValueError as exc:
        raise ReleaseError(f"release {tenant}/{release_id}: items.faiss is not a FAISS index ({exc})") from None
    n_items, want_dim = item_vectors.shape
    if (ntotal, dim) != (n_items, want_dim):
        raise ReleaseError(
            f"release {tenant}/{release_id}: items.faiss holds {ntotal} vectors of dimension {dim}, but "
            f"item_vectors.npy has {n_items} items of dimension {want_dim}; refusing to load a mismatched index"
        )


def index_mismatch(files: dict[str, bytes]) -> str | None:
    """For the writer: why a release's index cannot belong to its item vectors, read from both
    headers (no array is loaded). None when they agree, or when either is not even readable:
    loading refuses such files anyway, with its own reason."""
    import io

    if "items.faiss" not in files or "item_vectors.npy" not in files:
        return None
    try:
        dim, ntotal = index_shape(files["items.faiss"])
        fh = io.BytesIO(files["item_vectors.npy"])
        version = np.lib.format.read_magic(fh)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(fh)
    except Exception:  # noqa: BLE001 - unreadable: the reader's checks say why
        return None
    if dtype.hasobject or len(shape) != 2:
        return None  # not a vector table at all: loading refuses it (and never unpickles)
    if (ntotal, dim) != tuple(shape):
        return f"items.faiss holds {ntotal} vectors of dimension {dim}, but item_vectors.npy has shape {tuple(shape)}"
    return None


def decode(
    tenant: str, release_id: str, manifest: dict[str, Any], scoring: Scoring, get: Callable[[str], bytes]
) -> Release:
    """The in-memory release from its verified files (`get` checks each file's sha256)."""
    users = codecs.read_parquet(get("users.parquet"))
    items = codecs.read_parquet(get("items.parquet"))
    model_meta = json.loads(get("model.json"))
    kind = model_meta.get("kind", "")
    if kind in registry.KINDS and registry.scoring(kind) != scoring:
        raise ReleaseError(
            f"release {tenant}/{release_id}: model.json says {kind!r}, which scores by {registry.scoring(kind)}, "
            f"but the release carries the files of a {scoring} release"
        )
    n_users, n_items = len(users), len(items)
    seen_indptr = codecs.read_npy(get("seen_indptr.npy"))
    seen_indices = codecs.read_npy(get("seen_indices.npy"))
    similarity, index_bytes = None, None
    if scoring == "dot":
        user_vectors = codecs.read_npy(get("user_vectors.npy")).astype(np.float32, copy=False)
        item_vectors = codecs.read_npy(get("item_vectors.npy")).astype(np.float32, copy=False)
        index_bytes = get("items.faiss")
        check_index(tenant, release_id, index_bytes, item_vectors.reshape(len(item_vectors), -1))
    else:
        similarity = _similarity(tenant, release_id, n_items, get)
        user_vectors = np.zeros((n_users, 0), dtype=np.float32)
        item_vectors = np.zeros((n_items, 0), dtype=np.float32)
    if (
        len(user_vectors) != n_users
        or len(item_vectors) != n_items
        or len(seen_indptr) != n_users + 1
        or (len(seen_indices) and (seen_indices.min() < 0 or seen_indices.max() >= n_items))
    ):
        raise ReleaseError(f"release {tenant}/{release_id}: vectors, id maps and seen lists disagree in size")
    optional = {n: get(n) if n in manifest["files"] else None for n in OPTIONAL_FILES}
    candidates = _row_table(tenant, release_id, "candidates.npy", optional["candidates.npy"], n_users, n_items)
    neighbors = _row_table(tenant, release_id, "neighbors.npy", optional["neighbors.npy"], n_items, n_items)
    two_stage = None
    if optional["ranker.safetensors"] is not None:
        from pipeline.twostage import serve  # imported only for releases that carry a ranker

        two_stage = serve.decode(optional, n_users, n_items, f"release {tenant}/{release_id}")
    segment_popular, segment_of = _segments(tenant, release_id, n_items, optional)
    return Release(
        tenant=tenant,
        release_id=release_id,
        manifest=manifest,
        user_ids=pd.Index(users["user_id"].astype(str).to_numpy(), dtype=object),
        item_ids=pd.Index(items["item_id"].astype(str).to_numpy(), dtype=object),
        user_vectors=user_vectors,
        item_vectors=item_vectors,
        seen_indptr=seen_indptr,
        seen_indices=seen_indices,
        popular=codecs.read_npy(get("popular.npy")),
        item_popularity=items["n_users"].to_numpy(dtype=np.float64),
        index_bytes=index_bytes,
        model_meta=model_meta,
        **item_attributes(optional["item_attributes.parquet"], n_items),
        user_stats=codecs.read_parquet(optional["user_stats.parquet"]) if optional["user_stats.parquet"] else None,
        similarity=similarity,
        candidates=candidates,
        neighbors=neighbors,
        encoder=_encoder(tenant, release_id, model_meta, item_vectors, get),
        two_stage=two_stage,
        segment_popular=segment_popular,
        segment_of=segment_of,
    )


def _row_table(
    tenant: str, release_id: str, name: str, data: bytes | None, n_rows: int, n_items: int
) -> np.ndarray | None:
    """An int32 [n_rows, C] table of item rows (-1 padded), checked against the id maps."""
    if data is None:
        return None
    table = codecs.read_npy(data)
    if (
        table.ndim != 2
        or len(table) != n_rows
        or table.dtype != np.int32
        or (table.size and (table.min() < -1 or table.max() >= n_items))
    ):
        raise ReleaseError(f"release {tenant}/{release_id}: {name} disagrees with the id maps")
    return table


def _encoder(
    tenant: str, release_id: str, model_meta: dict[str, Any], item_vectors: np.ndarray, get: Callable[[str], bytes]
) -> SequenceEncoder | None:
    """The encoder a "sequence" kind re-encodes folded-in users with (None for other kinds)."""
    if registry.fold_in(model_meta.get("kind", "")) != "sequence":
        return None
    from safetensors.numpy import load as st_load

    state = st_load(get("model.safetensors"))
    try:
        heads = int(model_meta["config"]["heads"])
        encoder = SequenceEncoder.from_state({**state, "item_vectors": item_vectors}, heads)
        encoder.encode(np.zeros(1, dtype=np.int64))  # every weight present and of a shape that fits
    except (KeyError, TypeError, ValueError) as exc:
        raise ReleaseError(f"release {tenant}/{release_id}: model.safetensors has no usable encoder ({exc})") from exc
    return encoder


def _segments(tenant: str, release_id: str, n_items: int, optional: dict[str, bytes | None]) -> tuple:
    """(segment lists, cold user -> segment) when the release has them, checked against the id maps."""
    lists, users = optional["segment_popular.npy"], optional["segment_users.parquet"]
    if lists is None or users is None:
        return None, None
    popular = codecs.read_npy(lists)
    table = codecs.read_parquet(users)
    seg = table["segment"].to_numpy()
    if (
        popular.ndim != 2
        or popular.dtype != np.int32
        or (popular.size and (popular.min() < -1 or popular.max() >= n_items))
        or (len(seg) and (seg.min() < 0 or seg.max() >= len(popular)))
    ):
        raise ReleaseError(f"release {tenant}/{release_id}: the segment lists disagree with the id maps")
    return popular, pd.Series(seg, index=pd.Index(table["user_id"].astype(str).to_numpy(), dtype=object))


def _similarity(tenant: str, release_id: str, n_items: int, get: Callable[[str], bytes]) -> sp.csr_matrix:
    """S from its CSR arrays, refused unless it is a well-formed finite n_items x n_items matrix."""
    indptr = codecs.read_npy(get("similarity_indptr.npy")).astype(np.int64, copy=False)
    indices = codecs.read_npy(get("similarity_indices.npy")).astype(np.int32, copy=False)
    data = codecs.read_npy(get("similarity_data.npy")).astype(np.float32, copy=False)
    if (
        indptr.ndim != 1
        or len(indptr) != n_items + 1
        or indptr[0] != 0
        or indptr[-1] != len(indices)
        or len(data) != len(indices)
        or (np.diff(indptr) < 0).any()
        or (len(indices) and (indices.min() < 0 or indices.max() >= n_items))
        or not np.isfinite(data).all()
    ):
        raise ReleaseError(f"release {tenant}/{release_id}: the similarity matrix disagrees with the id maps")
    return sp.csr_matrix((data, indices, indptr), shape=(n_items, n_items))


def item_attributes(data: bytes | None, n_items: int) -> dict[str, Any]:
    """Release fields from item_attributes.parquet: category codes, item x tag matrix, titles."""
    if data is None:
        return {}
    attrs = codecs.read_parquet(data)
    codes, categories = pd.factorize(attrs["category"], sort=True)  # null -> -1
    category = np.full(n_items, -1, dtype=np.int32)
    category[attrs["item_idx"].to_numpy()] = codes
    ex = attrs[["item_idx", "tags"]].explode("tags").dropna()
    tag_codes, tags = pd.factorize(ex["tags"].astype(str), sort=True)
    item_tags = sp.csr_matrix(
        (np.ones(len(ex), dtype=bool), (ex["item_idx"].to_numpy(dtype=np.int64), tag_codes)),
        shape=(n_items, len(tags)),
    )
    return {
        "item_category": category,
        "categories": pd.Index(categories.astype(str), dtype=object),
        "item_tags": item_tags,
        "tags": pd.Index(tags, dtype=object),
        "item_titles": _titles(attrs, n_items),
    }


def _titles(attrs: pd.DataFrame, n_items: int) -> np.ndarray | None:
    if "title" not in attrs or attrs["title"].isna().all():
        return None
    titles = np.full(n_items, None, dtype=object)
    titles[attrs["item_idx"].to_numpy()] = attrs["title"].astype(object).where(attrs["title"].notna(), None).to_numpy()
    return titles
