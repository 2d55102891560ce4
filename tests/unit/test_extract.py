from datetime import UTC, datetime

import pandas as pd
import pytest

from pipeline import extract
from pipeline.context import RunContext, StageError
from tests.conftest import write_tenant


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
    out = extract.load(ctx)
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
    out = extract.load(ctx)
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
    assert extract.load(ctx)["timestamp"].isna().sum() == 1
