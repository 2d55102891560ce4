"""The features stage's outputs as the training side reads them: `Features` and `ItemFeatures`.

Select, train, evaluate, the gate and publish all read the same indexed tables; they read
them here, from the declared artifacts, never by importing the features stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp

from pipeline.storage import paths

if TYPE_CHECKING:
    from pipeline.context import RunContext
    from pipeline.models.base import ItemFeatures, TrainData

TOKEN_BUCKETS = 1 << 14  # hashed title tokens per item: ids in [0, TOKEN_BUCKETS)


def temporal_holdout(user_idx: np.ndarray, timestamp: np.ndarray, item_idx: np.ndarray, fraction: float) -> np.ndarray:
    """Boolean mask of held-out events: the last floor(n_u * fraction) events of each user.

    Inputs are aligned arrays in any order; ties in time are broken by item index so the
    split is deterministic.
    """
    order = np.lexsort((item_idx, timestamp, user_idx))
    u_sorted = user_idx[order]
    counts = np.bincount(u_sorted)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    rank = np.arange(len(order)) - starts[u_sorted]
    n = counts[u_sorted]
    n_test = np.floor(n * fraction + 1e-9).astype(np.int64)
    mask_sorted = rank >= n - n_test
    mask = np.empty(len(order), dtype=bool)
    mask[order] = mask_sorted
    return mask


class _Indexed:
    """The users and items tables' sizes, for the two event views below."""

    users: pd.DataFrame
    items: pd.DataFrame

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def n_items(self) -> int:
        return len(self.items)


@dataclass(frozen=True)
class Features(_Indexed):
    """Indexed interactions of one run. `events` has user_idx, item_idx, timestamp, rating, holdout."""

    users: pd.DataFrame  # user_id, user_idx, n_events, n_train, n_holdout
    items: pd.DataFrame  # item_id, item_idx, n_events, n_train
    events: pd.DataFrame

    @classmethod
    def read(cls, ctx: RunContext) -> Features:
        return cls(
            users=ctx.read_parquet(paths.USERS),
            items=ctx.read_parquet(paths.ITEMS),
            events=ctx.read_parquet(paths.EVENTS),
        )

    def split(self, holdout: bool | None) -> pd.DataFrame:
        if holdout is None:
            return self.events
        return self.events[self.events["holdout"] == holdout]

    def matrix(self, holdout: bool | None = False) -> sp.csr_matrix:
        """Binary user x item matrix of the train split (False), holdout (True) or all (None)."""
        ev = self.split(holdout)
        return binary_matrix(ev["user_idx"].to_numpy(), ev["item_idx"].to_numpy(), (self.n_users, self.n_items))

    def relevant(self) -> sp.csr_matrix:
        """Holdout items to find per user: held-out pairs the user did not already have in train."""
        return relevant_of(self.matrix(True), self.matrix(False))


def _csr(column: pa.ChunkedArray, n_cols: int | None = None) -> sp.csr_matrix:
    """Binary CSR [rows, n_cols] from a list<int32> column (n_cols: largest value + 1 when None)."""
    lists = column.combine_chunks()
    offsets = lists.offsets.to_numpy().astype(np.int64)
    values = lists.flatten().to_numpy().astype(np.int32)
    if n_cols is None:
        n_cols = int(values.max()) + 1 if len(values) else 0
    return sp.csr_matrix((np.ones(len(values), np.float32), values, offsets - offsets[0]), shape=(len(lists), n_cols))


def read_item_features(ctx: RunContext) -> ItemFeatures | None:
    """The run's item attributes as model inputs, or None when the tenant has no catalog."""
    if not ctx.config.catalog:
        return None
    from pipeline.models.base import ItemFeatures  # lazily: the models package imports torch

    table = pq.read_table(pa.BufferReader(ctx.read(paths.ITEM_FEATURES)))
    return ItemFeatures(
        category=table.column("category").to_numpy().astype(np.int64),
        tags=_csr(table.column("tags")),
        tokens=_csr(table.column("tokens"), TOKEN_BUCKETS),
    )


def rows_of(ctx: RunContext, artifact: paths.Artifact) -> int:
    """A Parquet artifact's row count from its footer (no column is decoded)."""
    return pq.ParquetFile(pa.BufferReader(ctx.read(artifact))).metadata.num_rows


def _stream(ctx: RunContext, dtypes: dict[str, Any], holdout: bool | None) -> dict[str, np.ndarray]:
    """Columns of one split of events.parquet (train: False, holdout: True, all: None) as numpy
    arrays of the given dtypes, decoded one row group at a time into arrays allocated once for
    the split's length (counted first from the `holdout` column alone): neither the whole
    table in pandas nor the split's copy of it is ever held. `timestamp` as datetime64[us]."""
    events = pq.ParquetFile(pa.BufferReader(ctx.read(paths.EVENTS)))

    def kept(batch: pa.RecordBatch) -> np.ndarray:
        flags = batch.column("holdout").to_numpy(zero_copy_only=False)
        return flags if holdout else ~flags

    n = events.metadata.num_rows
    if holdout is not None:
        n = sum(int(np.count_nonzero(kept(b))) for b in events.iter_batches(columns=["holdout"]))
    out = {name: np.empty(n, dtype) for name, dtype in dtypes.items()}
    read = list(dtypes) + (["holdout"] if holdout is not None and "holdout" not in dtypes else [])
    pos = 0
    for batch in events.iter_batches(columns=read):
        mask = None if holdout is None else kept(batch)
        m = batch.num_rows if mask is None else int(np.count_nonzero(mask))
        for name in dtypes:
            values = batch.column(name).to_numpy(zero_copy_only=False)
            if name == "timestamp":  # UTC instants, whatever unit the file has
                values = values.astype("datetime64[us]")
            out[name][pos : pos + m] = values if mask is None else values[mask]
        pos += m
    if pos != n:
        raise ValueError(f"tenant {ctx.tenant}: {paths.EVENTS} changed while read ({pos} rows, expected {n})")
    return out


def train_data(ctx: RunContext, holdout: bool | None, item_features: ItemFeatures | None = None) -> TrainData:
    """One split of the run's events (train: False, holdout: True, all: None) as `TrainData`,
    the same arrays as `TrainData.from_events(Features.read(ctx).split(holdout), ...)`, streamed
    (`_stream`). At 100M events (80.8M in the train split) the train stage peaked at 14.9 GB
    reading through pandas; the arrays themselves are 40 bytes per event.
    """
    from pipeline.models.base import TrainData  # lazily: the models package imports torch

    weighted = "weight" in pq.ParquetFile(pa.BufferReader(ctx.read(paths.EVENTS))).schema_arrow.names
    dtypes: dict[str, Any] = {
        "user_idx": np.int64,
        "item_idx": np.int64,
        "timestamp": "datetime64[s]",  # floor to the second, as from_events
        "rating": np.float64,
        **({"weight": np.float64} if weighted else {}),
    }
    out = _stream(ctx, dtypes, holdout)
    return TrainData(
        n_users=rows_of(ctx, paths.USERS),
        n_items=rows_of(ctx, paths.ITEMS),
        user_idx=out["user_idx"],
        item_idx=out["item_idx"],
        timestamp=out["timestamp"].view(np.int64),
        rating=out["rating"],
        item_features=item_features,
        weight=out.get("weight"),
    )


@dataclass(frozen=True)
class Interactions(_Indexed):
    """The run's users and items, and the four event columns evaluate, the gate and publish use
    (17 bytes per event: int32 indices, datetime64[us], the holdout flag), streamed from
    events.parquet (`_stream`). What `Features` is for small tenants, without the events table
    in pandas: at 100M events that table alone is several GB and its groupbys more.
    """

    users: pd.DataFrame
    items: pd.DataFrame
    user_idx: np.ndarray
    item_idx: np.ndarray
    timestamp: np.ndarray
    holdout: np.ndarray

    @classmethod
    def read(cls, ctx: RunContext) -> Interactions:
        cols = _stream(
            ctx, {"user_idx": np.int32, "item_idx": np.int32, "timestamp": "datetime64[us]", "holdout": bool}, None
        )
        return cls(ctx.read_parquet(paths.USERS), ctx.read_parquet(paths.ITEMS), **cols)

    def matrix(self, holdout: bool | None = False, where: np.ndarray | None = None) -> sp.csr_matrix:
        """`Features.matrix`; `where` (a boolean mask over events) narrows it further."""
        keep = where if holdout is None else (self.holdout if holdout else ~self.holdout)
        if holdout is not None and where is not None:
            keep = keep & where
        u, i = (self.user_idx, self.item_idx) if keep is None else (self.user_idx[keep], self.item_idx[keep])
        return binary_matrix(u, i, (self.n_users, self.n_items))

    def relevant(self) -> sp.csr_matrix:
        """`Features.relevant`."""
        return relevant_of(self.matrix(True), self.matrix(False))


def binary_matrix(user_idx: np.ndarray, item_idx: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    """Binary CSR of (user, item) pairs, duplicates counted once, int32 indices."""
    m = sp.csr_matrix((np.ones(len(user_idx), dtype=np.float32), (user_idx, item_idx)), shape=shape)
    m.sum_duplicates()
    m.data[:] = 1.0
    return m


def relevant_of(held: sp.csr_matrix, train: sp.csr_matrix) -> sp.csr_matrix:
    """Held-out pairs the user did not already have in train (what a full ranking can find)."""
    rel = held - train.multiply(held)
    rel.eliminate_zeros()
    return sp.csr_matrix(rel)
