from datetime import UTC, datetime

import pandas as pd
import pytest

from pipeline.context import RunContext, StageError
from pipeline.data import extract
from pipeline.storage import paths
from tests.conftest import write_tenant


@pytest.fixture(autouse=True, params=["pandas", "duckdb"])
def engine(request, monkeypatch):
    """Every case on both engines: the out-of-core extract (data.engine: duckdb) keeps the same rules."""
    monkeypatch.setattr(extract, "engine_of", lambda ctx: request.param)
    return request.param


def _ctx(settings, cfg, end=datetime(2025, 1, 10, tzinfo=UTC)):
    return RunContext(config=cfg, interval_end=end, settings=settings)


def test_maps_columns_keeps_ids_as_strings_and_cuts_at_interval_end(settings):
    df = pd.DataFrame(
        {
            "uid": ["007", "007", "8"],
            "iid": ["0001", "2", "3"],
            "when": ["2025-01-01T10:00:00Z", "2025-01-09T23:59:59+00:00", "2025-01-10T00:00:00Z"],
        }
    )
    cfg = write_tenant(
        settings, "acme", df, source={"columns": {"user_id": "uid", "item_id": "iid", "timestamp": "when"}}
    )
    ctx = _ctx(settings, cfg)
    result = extract.extract(ctx)
    out = ctx.read_parquet(paths.INTERACTIONS)
    assert result["rows"] == 2 and result["dropped_after_interval_end"] == 1
    assert out["user_id"].tolist() == ["007", "007"]  # leading zeros survive: ids are strings
    assert out["item_id"].tolist() == ["0001", "2"]
    assert str(out["timestamp"].dtype) == "datetime64[us, UTC]"
    assert out["rating"].isna().all()


def test_epoch_seconds_parquet_folder_and_byte_identical_rerun(settings):
    folder = settings.data_root / "folder"
    folder.mkdir()
    pd.DataFrame(
        {"user_id": ["a", "b"], "item_id": ["x", "y"], "timestamp": [1736000000, 1736100000], "rating": [4.0, 5.0]}
    ).to_parquet(folder / "part-1.parquet")
    pd.DataFrame({"user_id": ["c"], "item_id": ["x"], "timestamp": [1736200000], "rating": [3.0]}).to_csv(
        folder / "part-2.csv", index=False
    )
    cfg = write_tenant(
        settings,
        "acme",
        pd.DataFrame({"user_id": [], "item_id": [], "timestamp": [], "rating": []}),
        source={"uri": str(folder)},
    )
    ctx = _ctx(settings, cfg)
    first = extract.extract(ctx)
    blob = ctx.store.get(first["key"])
    extract.extract(ctx)
    assert ctx.store.get(first["key"]) == blob
    out = ctx.read_parquet(paths.INTERACTIONS)
    assert first["files"] == 2 and first["rows"] == 3
    assert out["timestamp"].iloc[0] == pd.Timestamp(1736000000, unit="s", tz="UTC")
    assert out["rating"].tolist() == [4.0, 5.0, 3.0]


def test_missing_column_names_tenant_file_field_and_columns(settings):
    df = pd.DataFrame({"user": ["a"], "item_id": ["x"], "timestamp": [1]})
    cfg = write_tenant(settings, "acme", df)
    with pytest.raises(StageError) as err:
        extract.extract(_ctx(settings, cfg))
    msg = str(err.value)
    assert "tenant acme" in msg and "interactions.csv" in msg
    assert "'user_id' (source.columns.user_id)" in msg and "'rating' (source.columns.rating)" in msg
    assert "columns present: ['user', 'item_id', 'timestamp']" in msg


def test_missing_source_and_bad_encoding(settings):
    cfg = write_tenant(settings, "acme", pd.DataFrame({"user_id": ["a"]}), source={"uri": "nowhere/x.csv"})
    with pytest.raises(StageError, match="no such file or folder"):
        extract.extract(_ctx(settings, cfg))
    bad = settings.data_root / "latin1.csv"
    bad.write_bytes("user_id,item_id,timestamp,rating\nJos\xe9,x,1,1\n".encode("latin-1"))
    cfg = write_tenant(settings, "acme", pd.DataFrame({"user_id": ["a"]}), source={"uri": str(bad)})
    with pytest.raises(StageError, match="not valid UTF-8"):
        extract.extract(_ctx(settings, cfg))


def test_unparseable_timestamps_are_kept_for_validation(settings):
    df = pd.DataFrame(
        {"user_id": ["a", "b"], "item_id": ["x", "y"], "timestamp": ["2025-01-01", "yesterday"], "rating": [1, 2]}
    )
    cfg = write_tenant(settings, "acme", df)
    ctx = _ctx(settings, cfg)
    extract.extract(ctx)
    assert ctx.read_parquet(paths.INTERACTIONS)["timestamp"].isna().sum() == 1


def test_event_types_weights_and_rating_threshold(settings):
    df = pd.DataFrame(
        {
            "user_id": list("abcdef"),
            "item_id": list("xxyyzz"),
            "timestamp": [1736000000 + i for i in range(6)],
            "rating": [5, 1, 4, 2, 5, 5],
            "kind": ["View", "view", "purchase", "click", "like", None],
        }
    )
    cfg = write_tenant(
        settings,
        "acme",
        df,
        source={
            "columns": {"event_type": "kind", "rating": "rating"},
            "event_types": {"view": 1, "click": 2, "purchase": 8},
            "rating_threshold": 3,
        },
    )
    ctx = _ctx(settings, cfg)
    result = extract.extract(ctx)
    out = ctx.read_parquet(paths.INTERACTIONS)
    assert out[["user_id", "event_type", "weight"]].values.tolist() == [
        ["a", "view", 1.0],
        ["c", "purchase", 8.0],
        ["f", "interaction", 1.0],  # no type: "interaction", weight 1 unless listed
    ]
    assert result["dropped_unknown_event_types"] == {"like": 1}
    assert result["dropped_below_rating_threshold"] == 2
    assert result["event_types"] == {"interaction": 1, "purchase": 1, "view": 1}


def test_epoch_source_and_api_events_both_keep_their_timestamps(settings):
    from pipeline.data import event_log

    df = pd.DataFrame({"user_id": ["a"], "item_id": ["x"], "timestamp": [1736000000], "rating": [1.0]})
    cfg = write_tenant(settings, "acme", df)
    ctx = _ctx(settings, cfg)
    event_log.append(
        ctx.store, "acme", pd.DataFrame({"user_id": ["b"], "item_id": ["y"], "timestamp": ["2025-01-08T10:00:00Z"]})
    )
    extract.extract(ctx)
    out = ctx.read_parquet(paths.INTERACTIONS)
    assert out["timestamp"].notna().all() and out["user_id"].tolist() == ["a", "b"]


def test_window_plan_bootstrap_lookback_catch_up_and_rerun():
    from datetime import date, timedelta

    from pipeline.data import history

    end = datetime(2025, 1, 10, 2, tzinfo=UTC)
    start = end - timedelta(days=1)
    days = [date(2025, 1, d) for d in range(1, 10)]
    w = history.plan([], start, end, 2)
    assert w.bootstrap and w.start is None and w.end_day == date(2025, 1, 10)
    w = history.plan(days, start, end, 2)  # days 7, 8, 9 are rewritten
    assert w.first_day == date(2025, 1, 7) and not w.caught_up
    assert [d for d in days if w.rewrites(d)] == days[-3:]
    w = history.plan(days[:3], start, end, 2)  # the last partition is day 3: catch up from day 4
    assert w.first_day == date(2025, 1, 4) and w.caught_up
    w = history.plan(days, datetime(2025, 1, 4, 2, tzinfo=UTC), datetime(2025, 1, 5, 2, tzinfo=UTC), 0)
    assert w.first_day == date(2025, 1, 4) and [d for d in days if w.rewrites(d)] == [date(2025, 1, 4)]
    assert w.last_source_day == date(2025, 1, 5)
    midnight = history.plan(days, datetime(2025, 1, 4, tzinfo=UTC), datetime(2025, 1, 5, tzinfo=UTC), 0)
    assert midnight.last_source_day == date(2025, 1, 4)


def test_interval_start_given_or_from_the_schedule():
    from pipeline.data.history import interval_start

    end = datetime(2025, 4, 1, tzinfo=UTC)
    assert interval_start("0 2 * * *", end) == datetime(2025, 3, 31, 2, tzinfo=UTC)
    assert interval_start("@hourly", end) == datetime(2025, 3, 31, 23, tzinfo=UTC)
    assert interval_start("0 2 * * *", end, datetime(2025, 3, 20, tzinfo=UTC)) == datetime(2025, 3, 20, tzinfo=UTC)
    assert interval_start("0 2 * * *", end, end) == datetime(2025, 3, 31, 2, tzinfo=UTC)  # manual run: empty
    assert interval_start("@once", end) == datetime(2025, 3, 31, tzinfo=UTC)


def test_partition_dates_in_paths():
    from datetime import date

    from pipeline.data.sources import partition_date

    assert partition_date("dt=2025-01-02/part-0.parquet", "dt") == date(2025, 1, 2)
    assert partition_date("region=eu/dt=2025-01-02/x.csv", "dt") == date(2025, 1, 2)
    assert partition_date("dt=2025-01-02.csv", "dt") is None and partition_date("dt=latest/x.csv", "dt") is None
