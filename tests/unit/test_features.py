from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pytest

from pipeline.context import RunContext, StageError
from pipeline.data import extract
from pipeline.features import dataset
from pipeline.features import stage as features
from pipeline.storage import codecs, paths
from tests.conftest import write_tenant


def _extracted(ctx: RunContext) -> None:
    """extract, and validate's verdict that no user is excluded (these tests are about features)."""
    extract.extract(ctx)
    ctx.write(paths.EXCLUDED_USERS, codecs.parquet_bytes(pd.DataFrame({"user_id": pd.array([], dtype="string")})))


def test_temporal_holdout_takes_last_fifth_per_user():
    # user 0: 10 events -> last 2 held out; user 1: 4 events -> floor(0.8) = 0 held out
    users = np.array([0] * 10 + [1] * 4)
    ts = np.array(list(range(10, 0, -1)) + [1, 2, 3, 4])  # user 0 given in reverse time order
    items = np.arange(14)
    mask = dataset.temporal_holdout(users, ts, items, 0.2)
    assert mask[:10].tolist() == [True, True] + [False] * 8  # ts 10 and 9 are the latest
    assert not mask[10:].any()


def test_holdout_ties_broken_by_item_index():
    mask = dataset.temporal_holdout(np.zeros(5, int), np.ones(5, int), np.array([4, 3, 2, 1, 0]), 0.2)
    assert mask.tolist() == [True, False, False, False, False]


def test_features_stage_id_maps_and_relevance(settings, small_df):
    cfg = write_tenant(settings, "acme", small_df)
    ctx = RunContext(config=cfg, interval_end=datetime(2026, 1, 1, tzinfo=UTC), settings=settings)
    _extracted(ctx)
    result = features.features(ctx)
    feats = dataset.Features.read(ctx)
    assert result["users"] == small_df["user_id"].nunique() == feats.n_users
    assert feats.users["user_idx"].tolist() == list(range(feats.n_users))
    assert feats.users["user_id"].is_monotonic_increasing
    assert result["train_events"] + result["holdout_events"] == len(small_df)
    rel, train = feats.relevant(), feats.matrix(False)
    assert rel.multiply(train).nnz == 0  # nothing to find that was already in train


def test_too_few_users_is_a_clear_error(settings):
    df = pd.DataFrame(
        {
            "user_id": ["a", "b"] * 60,
            "item_id": [f"i{i}" for i in range(120)],
            "timestamp": np.arange(120) + 1_700_000_000,
            "rating": 1.0,
        }
    )
    cfg = write_tenant(settings, "acme", df)
    ctx = RunContext(config=cfg, interval_end=datetime(2026, 1, 1, tzinfo=UTC), settings=settings)
    _extracted(ctx)
    with pytest.raises(StageError, match=r"too few to train: 2 users \(features.min_users=10\)"):
        features.features(ctx)


def test_catalog_items_without_events_are_indexed_with_their_attributes(settings, small_df):
    items = sorted(small_df["item_id"].unique())
    catalog = pd.DataFrame(
        {
            "sku": [*items, "zz-new"],
            "section": ["a" if n % 2 else "b" for n in range(len(items))] + ["b"],
            "labels": ["x|y"] * len(items) + ["y|z"],
            "name": [f"Item {n}" for n in range(len(items))] + ["Brand new item"],
        }
    )
    path = settings.data_root / "catalog.csv"
    catalog.to_csv(path, index=False)
    columns = {"item_id": "sku", "category": "section", "tags": "labels", "title": "name"}
    cfg = write_tenant(settings, "acme", small_df, catalog={"uri": str(path), "columns": columns})
    ctx = RunContext(config=cfg, interval_end=datetime(2026, 1, 1, tzinfo=UTC), settings=settings)
    _extracted(ctx)
    result = features.features(ctx)
    feats, attrs = dataset.Features.read(ctx), dataset.read_item_features(ctx)
    assert result["items"] == len(items) + 1 and result["items_without_events"] == 1
    new = feats.items.set_index("item_id").loc["zz-new"]
    assert new["n_events"] == 0 and feats.items["item_id"].is_monotonic_increasing
    row = int(new["item_idx"])
    assert attrs.category[row] == 1  # sorted categories: a=0, b=1
    assert attrs.category[0] == 1 and attrs.category[1] == 0
    assert attrs.tags.shape == (feats.n_items, 3) and attrs.tags[row].indices.tolist() == [1, 2]  # x=0, y=1, z=2
    assert attrs.tags[0].indices.tolist() == [0, 1]
    new_tokens = set(attrs.tokens[row].indices)
    assert len(new_tokens) == 3 and attrs.tokens.shape[1] == dataset.TOKEN_BUCKETS
    assert new_tokens & set(attrs.tokens[0].indices)  # both titles have the word "item"


def test_no_catalog_means_no_item_features(ctx):
    _extracted(ctx)
    features.features(ctx)
    assert dataset.read_item_features(ctx) is None


def _many_row_groups(settings, small_df, weighted: bool):
    """A featurized tenant whose events.parquet has sub-second timestamps, optional weights and
    row groups of 97 rows (so a split straddles batches)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cfg = write_tenant(settings, "acme", small_df)
    ctx = RunContext(config=cfg, interval_end=datetime(2026, 1, 1, tzinfo=UTC), settings=settings)
    _extracted(ctx)
    features.features(ctx)
    table = pq.read_table(pa.BufferReader(ctx.read(paths.EVENTS)))
    micros = table.column("timestamp").cast(pa.int64()).to_numpy() + np.arange(table.num_rows) * 7919 % 1_000_000
    table = table.set_column(
        table.schema.get_field_index("timestamp"),
        "timestamp",
        pa.array(micros, pa.int64()).cast(table.schema.field("timestamp").type),
    )
    rng = np.random.default_rng(0)
    weights = rng.choice([1.0, 2.5, 8.0], table.num_rows)
    if "weight" in table.column_names:
        table = table.drop_columns(["weight"])
    if weighted:
        table = table.append_column("weight", pa.array(weights))
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=97)
    ctx.write(paths.EVENTS, sink.getvalue().to_pybytes())
    assert pq.ParquetFile(pa.BufferReader(ctx.read(paths.EVENTS))).metadata.num_row_groups > 10
    return ctx


@pytest.mark.parametrize("weighted", [True, False])
def test_streamed_train_data_equals_the_pandas_split(settings, small_df, weighted):
    """`dataset.train_data` (row group by row group into preallocated arrays) gives exactly the
    arrays of `TrainData.from_events(Features.read(ctx).split(h))` for every split, across many
    row groups, sub-second timestamps (floored to the second) and with or without weights."""
    from pipeline.models.base import TrainData

    ctx = _many_row_groups(settings, small_df, weighted)
    feats = dataset.Features.read(ctx)
    for holdout in (False, True, None):
        want = TrainData.from_events(feats.split(holdout), feats.n_users, feats.n_items)
        got = dataset.train_data(ctx, holdout)
        assert (got.n_users, got.n_items) == (want.n_users, want.n_items)
        assert 0 < len(got.user_idx) == len(want.user_idx)
        for name in ("user_idx", "item_idx", "timestamp", "rating"):
            a, b = getattr(got, name), getattr(want, name)
            assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True), (holdout, name)
        assert (got.weight is None) == (want.weight is None) == (not weighted)
        if weighted:
            assert np.array_equal(got.weight, want.weight)


def test_streamed_interactions_equal_the_pandas_features(settings, small_df):
    """`Interactions` (four streamed columns) gives the same matrices, relevant set and
    timestamps as `Features` (the events table in pandas), and publish's vectorised seen lists
    are the pandas groupby's: each user's distinct items, latest first, ties by item index."""
    from pipeline.release.publish import _seen_csr

    ctx = _many_row_groups(settings, small_df, weighted=False)
    feats, lean = dataset.Features.read(ctx), dataset.Interactions.read(ctx)
    assert (lean.n_users, lean.n_items) == (feats.n_users, feats.n_items)
    for holdout in (False, True, None):
        assert (lean.matrix(holdout) != feats.matrix(holdout)).nnz == 0
    assert (lean.relevant() != feats.relevant()).nnz == 0 and lean.relevant().nnz > 0
    stamps = feats.events["timestamp"].dt.tz_convert(None).to_numpy("datetime64[us]")
    assert np.array_equal(lean.timestamp, stamps)
    late = lean.timestamp >= np.sort(lean.timestamp)[len(stamps) // 2]
    want = feats.events[feats.events["holdout"] & late]
    assert (lean.matrix(True, where=late) != dataset.binary_matrix(
        want["user_idx"].to_numpy(), want["item_idx"].to_numpy(), (feats.n_users, feats.n_items)
    )).nnz == 0  # fmt: skip

    ev = feats.events
    last = ev.groupby(["user_idx", "item_idx"], sort=False)["timestamp"].max().reset_index()
    last = last.sort_values(["user_idx", "timestamp", "item_idx"], ascending=[True, False, True], kind="stable")
    indptr, indices = _seen_csr(lean)
    assert np.array_equal(indptr[1:] - indptr[:-1], np.bincount(last["user_idx"], minlength=feats.n_users))
    assert np.array_equal(indices, last["item_idx"].to_numpy()) and indices.dtype == np.int32


def test_seen_lists_by_hand():
    """Repeats count once at their latest time; latest first; equal times by item index."""
    from pipeline.release.publish import _seen_csr

    t = np.array([5, 9, 9, 1, 3, 3, 7], dtype="datetime64[s]").astype("datetime64[us]")
    lean = dataset.Interactions(
        users=pd.DataFrame({"user_idx": range(3)}),
        items=pd.DataFrame({"item_idx": range(4)}),
        user_idx=np.array([0, 0, 0, 0, 2, 2, 2], np.int32),
        item_idx=np.array([3, 1, 2, 3, 0, 1, 0], np.int32),
        timestamp=t,
        holdout=np.zeros(7, bool),
    )
    indptr, indices = _seen_csr(lean)
    assert indptr.tolist() == [0, 3, 3, 5]
    # user 0: items 1 and 2 at t=9 (ties by index), then 3 (latest 5); user 2: 0 at 7, then 1 at 3
    assert indices.tolist() == [1, 2, 3, 0, 1]
