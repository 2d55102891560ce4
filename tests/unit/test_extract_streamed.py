"""The out-of-core extract (data.engine: duckdb) writes what the in-memory one writes.

tests/unit/test_extract.py and tests/integration/test_history.py / test_sources.py run every
case on both engines; here the two engines run side by side on input made to trip a
reimplementation, over two nightly runs, and their outputs are compared byte for byte."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest

from pipeline.context import RunContext, StageError
from pipeline.data import erased, event_log, extract, history
from pipeline.samples import synthetic
from pipeline.storage import paths
from tests.conftest import write_tenant

END = datetime(2025, 4, 1, tzinfo=UTC)


def _tricky(seed: int = 5) -> pd.DataFrame:
    """ISO timestamps (offsets, dates only, garbage, blanks), ids with blanks and pandas' NA
    strings, event types in any case or missing, ratings that are not numbers, rows after the
    interval's end, non-ASCII ids and exact duplicate rows."""
    df = synthetic.interactions(n_users=90, n_items=60, mean_events=12, seed=seed, start="2025-01-01", days=95)
    rng = np.random.default_rng(seed)
    ts = pd.to_datetime(df["timestamp"], unit="s", utc=True)
    out = pd.DataFrame(
        {
            "user_id": df["user_id"].astype(str),
            "item_id": df["item_id"].astype(str),
            "timestamp": ts.dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "rating": df["rating"].astype(str),
            "kind": rng.choice(["view", " View ", "CLICK", "purchase", "", "like", "skip"], len(df)),
        }
    )
    k = len(out)
    out.loc[rng.random(k) < 0.05, "timestamp"] = (ts + pd.Timedelta(hours=3)).dt.strftime("%Y-%m-%dT%H:%M:%S+03:00")
    out.loc[rng.random(k) < 0.02, "timestamp"] = ts.dt.strftime("%Y-%m-%d")
    out.loc[rng.random(k) < 0.01, "timestamp"] = "not a time"
    out.loc[rng.random(k) < 0.01, "timestamp"] = ""
    bad = rng.random(k) < 0.03
    out.loc[bad, "rating"] = rng.choice(["", "n/a", "five", "NaN", " 4.5 "], bad.sum())
    out.loc[rng.random(k) < 0.02, "user_id"] = "  " + out["user_id"] + "\t"
    odd = rng.random(k) < 0.01
    out.loc[odd, "item_id"] = rng.choice(["NA", "null", "", "é9", "ü"], odd.sum())
    extra = pd.DataFrame(
        {
            "user_id": ["ü7", "u10", "U1", "u1", "u1"],
            "item_id": ["i1", "I1", "é2", "i10", "i10"],
            "timestamp": ["2025-03-31T23:59:59.999999Z", "2025-04-01T00:00:00Z", "2025-04-02", "2025-03-30T01:00Z"]
            + ["2025-03-30T01:00Z"],
            "rating": ["3", "4", "5", "1", "1"],
            "kind": ["view", "view", "click", "Purchase", "Purchase"],
        }
    )
    return pd.concat([out, extra], ignore_index=True).sample(frac=1.0, random_state=seed).reset_index(drop=True)


def _config(settings, engine: str, df: pd.DataFrame):
    return write_tenant(
        settings,
        "acme",
        df,
        source={
            "columns": {"user_id": "user_id", "item_id": "item_id", "timestamp": "timestamp", "rating": "rating"}
            | {"event_type": "kind"},
            "event_types": {"view": 1, "click": 2.5, "purchase": 8, "skip": 0},
            "rating_threshold": 2,
            "lookback_days": 3,
        },
        data={"engine": engine},
    )


def _runs(settings, tmp_path, engine: str, df: pd.DataFrame, monkeypatch) -> list[tuple[dict, bytes, dict]]:
    monkeypatch.setattr(extract, "engine_of", lambda ctx: engine)
    s = settings.model_copy(update={"artifact_root": str(tmp_path / engine)})
    cfg = _config(s, engine, df)
    store = RunContext(config=cfg, interval_end=END, settings=s).store
    event_log.append(  # API events: one stamped long before the window (filed under its arrival day)
        store,
        "acme",
        pd.DataFrame(
            {
                "user_id": ["api1", "api2", " api3 "],
                "item_id": ["x", "y", "z"],
                "timestamp": ["2024-12-01T00:00:00Z", "2025-03-31T10:00:00Z", "2025-04-01T10:00:00Z"],
                "event_type": ["CLICK", "view", None],
            }
        ),
        received_at=datetime(2025, 3, 31, 12, tzinfo=UTC),
    )
    erased.add(store, "acme", str(df["user_id"].iloc[0]).strip())
    out = []
    for end in (END, END + timedelta(days=1)):
        if end > END:  # rows that arrived late, stamped before the next run's window
            late = df.iloc[:4].assign(timestamp="2025-03-01T05:00:00Z", kind="view", rating="4")
            late.to_csv(cfg.source.uri, mode="a", header=False, index=False)
        ctx = RunContext(config=cfg, interval_end=end, settings=s)
        result = extract.extract(ctx)
        parts = {str(d): store.get(k) for d, k in history.partitions(store, "acme").items()}
        out.append((result, ctx.read(paths.INTERACTIONS), parts))
    return out


def test_duckdb_extract_writes_the_pandas_extracts_bytes(settings, tmp_path, monkeypatch):
    df = _tricky()
    pandas_runs = _runs(settings, tmp_path, "pandas", df, monkeypatch)
    duck_runs = _runs(settings, tmp_path, "duckdb", df, monkeypatch)
    for (rp, bp, hp), (rd, bd, hd) in zip(pandas_runs, duck_runs, strict=True):
        assert rp.pop("engine") == "pandas" and rd.pop("engine") == "duckdb"
        rp.pop("uri"), rd.pop("uri")
        assert rd == rp
        assert hd == hp  # the history partitions, byte for byte
        assert bd == bp  # interactions.parquet, byte for byte
    first = pandas_runs[0][0]
    # the input did trip every rule
    assert first["rows"] > 500 and first["unparseable_timestamps"] > 5 and first["dropped_after_interval_end"] > 2
    assert first["dropped_erased_users"] > 0 and first["dropped_zero_weight"] > 0
    assert first["dropped_below_rating_threshold"] > 0 and first["dropped_unknown_event_types"]["like"] > 0
    assert first["event_log_rows"] == 3 and first["event_log_late_rows"] == 0
    second = pandas_runs[1][0]
    assert second["history_partitions_read"] > 0 and second["late_dropped"] > 0


def test_epoch_parquet_numbers_and_fractions_as_pandas_reads_them(settings, tmp_path, monkeypatch):
    """Epoch milliseconds as integers, floats with fractions and strings in Parquet files."""
    folder = settings.data_root / "epochs"
    folder.mkdir()
    base = 1_736_000_000_000
    pd.DataFrame(
        {"user_id": [1, 2, 3], "item_id": [10, 20, 30], "timestamp": [base, base + 1, base + 999], "rating": [1, 2, 3]}
    ).to_parquet(folder / "a.parquet")
    pd.DataFrame(
        {
            "user_id": ["a", "b", "c"],
            "item_id": ["x", "y", "z"],
            "timestamp": [base + 0.123, base + 1.5, np.nan],
            "rating": [np.nan, 2.0, 3.0],
        }
    ).to_parquet(folder / "b.parquet")
    pd.DataFrame(
        {"user_id": ["d", "e"], "item_id": ["x", "y"], "timestamp": [str(base + 7), f"{base + 0.25}"], "rating": 1.0}
    ).to_parquet(folder / "c.parquet")
    got = {}
    for engine in ("pandas", "duckdb"):
        monkeypatch.setattr(extract, "engine_of", lambda ctx, engine=engine: engine)
        s = settings.model_copy(update={"artifact_root": str(tmp_path / engine)})
        cfg = write_tenant(s, "acme", pd.DataFrame(), source={"uri": str(folder), "timestamp_unit": "ms"})
        ctx = RunContext(config=cfg, interval_end=END, settings=s)
        extract.extract(ctx)
        got[engine] = ctx.read(paths.INTERACTIONS)
    assert got["duckdb"] == got["pandas"]
    out = RunContext(config=cfg, interval_end=END, settings=s).read_parquet(paths.INTERACTIONS)
    assert {"1", "2", "3"} <= set(out["user_id"]) and out["timestamp"].isna().sum() == 1


def test_bad_parquet_and_missing_column_name_tenant_file_and_reason(settings, monkeypatch):
    monkeypatch.setattr(extract, "engine_of", lambda ctx: "duckdb")
    folder = settings.data_root / "bad"
    folder.mkdir()
    (folder / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    cfg = write_tenant(settings, "acme", pd.DataFrame(), source={"uri": str(folder)})
    with pytest.raises(StageError) as err:
        extract.extract(RunContext(config=cfg, interval_end=END, settings=settings))
    msg = str(err.value)
    assert "tenant acme" in msg and "broken.parquet: unreadable as parquet" in msg
    (folder / "broken.parquet").unlink()
    pd.DataFrame({"user": ["a"], "item_id": ["x"], "timestamp": [1]}).to_parquet(folder / "cols.parquet")
    with pytest.raises(StageError) as err:
        extract.extract(RunContext(config=cfg, interval_end=END, settings=settings))
    msg = str(err.value)
    assert "tenant acme" in msg and "cols.parquet: column 'user_id' (source.columns.user_id)" in msg
    assert "columns present: ['user', 'item_id', 'timestamp']" in msg
