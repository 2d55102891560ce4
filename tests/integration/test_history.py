"""The incremental interaction history: nightly runs vs a backfill, reruns, late events, gaps.

Each scenario runs `extract` against its own artifact root; "nightly" runs see the source as
it was at their run time (events before it), a backfill sees the finished source.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest

from pipeline.config import TenantConfig
from pipeline.context import RunContext
from pipeline.data import event_log, extract, history
from pipeline.samples import synthetic
from pipeline.storage import paths
from tests.conftest import isolated_settings


@pytest.fixture(autouse=True, params=["pandas", "duckdb"])
def engine(request, monkeypatch):
    """Every case on both engines: the out-of-core extract (data.engine: duckdb) keeps the same rules."""
    monkeypatch.setattr(extract, "engine_of", lambda ctx: request.param)
    return request.param


DAY0 = datetime(2025, 5, 1, tzinfo=UTC)
DAYS = 10
RUN_HOUR = 2  # the default schedule "0 2 * * *": intervals end at 02:00, not at midnight


@pytest.fixture(scope="module")
def events() -> pd.DataFrame:
    df = synthetic.interactions(n_users=60, n_items=40, mean_events=12, seed=3, start="2025-05-01", days=DAYS + 2)
    rng = np.random.default_rng(0)
    df["event_type"] = rng.choice(["view", "click", "purchase"], len(df), p=[0.6, 0.3, 0.1])
    return df


def _end(k: int) -> datetime:
    return DAY0 + timedelta(days=k, hours=RUN_HOUR)


def _write_source(root, layout: str, df: pd.DataFrame) -> str:
    """The tenant's source as of some moment: one CSV, or Parquet partitions by event date."""
    if layout == "file":
        path = root / "source.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(path, index=False)
        return str(path)
    folder = root / "source"
    days = pd.to_datetime(df["timestamp"], unit="s", utc=True).dt.strftime("%Y-%m-%d")
    for day, part in df.groupby(days, sort=True):
        (folder / f"dt={day}").mkdir(parents=True, exist_ok=True)
        part.reset_index(drop=True).to_parquet(folder / f"dt={day}" / "part-0.parquet")
    return str(folder)


def _config(uri: str, **source) -> TenantConfig:
    return TenantConfig.model_validate(
        {
            "tenant": "acme",
            "source": {
                "uri": uri,
                "columns": {"rating": "rating", "event_type": "event_type"},
                "event_types": {"view": 1, "click": 2, "purchase": 8},
                **source,
            },
        }
    )


def _run(settings, cfg, k: int) -> dict:
    """The run Airflow would make for the interval [day k-1 02:00, day k 02:00)."""
    ctx = RunContext(config=cfg, interval_end=_end(k), interval_start=_end(k - 1), settings=settings)
    return extract.extract(ctx)


def _history_bytes(settings) -> dict[str, bytes]:
    store = RunContext(config=_config("x.csv"), interval_end=DAY0, settings=settings).store
    return {key: store.get(key) for key in history.partitions(store, "acme").values()}


def _api_events(df: pd.DataFrame) -> pd.DataFrame:
    """A few events POSTed to the serving API (they join the history like source rows)."""
    api = df.iloc[::25][["user_id", "item_id", "timestamp"]].copy()
    api["timestamp"] = pd.to_datetime(api["timestamp"], unit="s", utc=True) + pd.Timedelta(minutes=7)
    api["event_type"] = "click"
    return api


def _settings(tmp_path, mlflow_uri, name: str):
    (tmp_path / name).mkdir()
    return isolated_settings(tmp_path / name, mlflow_uri)


@pytest.mark.parametrize("layout", ["partitioned", "file"])
def test_nightly_runs_and_a_backfill_write_byte_identical_history(tmp_path, mlflow_uri, events, layout):
    ts = pd.to_datetime(events["timestamp"], unit="s", utc=True)
    api = _api_events(events)

    nightly = _settings(tmp_path, mlflow_uri, "nightly")
    outputs = {}
    for k in range(1, DAYS + 1):  # each night: the source and the API log as they were then
        src = _write_source(tmp_path / "nightly-src", layout, events[ts < _end(k)])
        event_log.append(
            RunContext(config=_config(src), interval_end=_end(k), settings=nightly).store,
            "acme",
            api[((api["timestamp"] >= _end(k - 1)) | (k == 1)) & (api["timestamp"] < _end(k))],
        )
        result = _run(nightly, _config(src), k)
        # bootstrap while no partition is older than the window (the first 3 nights here)
        assert result["bootstrap"] == (k <= 3) and not result["caught_up"]
        ctx = RunContext(config=_config(src), interval_end=_end(k), settings=nightly)
        outputs[k] = ctx.store.get(ctx.key(paths.INTERACTIONS))
        out = ctx.read_parquet(paths.INTERACTIONS)  # what training reads: every event before the interval end
        assert len(out) == int((ts < _end(k)).sum()) + int((api["timestamp"] < _end(k)).sum())

    backfill = _settings(tmp_path, mlflow_uri, "backfill")
    src = _write_source(tmp_path / "backfill-src", layout, events)  # the finished source
    store = RunContext(config=_config(src), interval_end=_end(1), settings=backfill).store
    event_log.append(store, "acme", api)
    for k in range(1, DAYS + 1):
        result = _run(backfill, _config(src), k)
        ctx = RunContext(config=_config(src), interval_end=_end(k), settings=backfill)
        assert ctx.store.get(ctx.key(paths.INTERACTIONS)) == outputs[k], f"run {k}"

    a, b = _history_bytes(nightly), _history_bytes(backfill)
    assert len(a) == DAYS and a.keys() == b.keys()
    assert all(a[key] == b[key] for key in a)
    assert result["history_partitions_written"] == 3  # the interval's day + 2 lookback days


def test_rerunning_a_day_replaces_that_partition_and_nothing_else(tmp_path, mlflow_uri, events):
    settings = _settings(tmp_path, mlflow_uri, "root")
    src = _write_source(tmp_path / "src", "partitioned", events)
    for k in range(1, DAYS + 1):
        _run(settings, _config(src), k)
    before = _history_bytes(settings)
    runs_before = {k: _run_output(settings, src, k) for k in range(1, DAYS + 1)}

    # day 5's source changes (a correction): rerun the interval that covers day 5
    ts = pd.to_datetime(events["timestamp"], unit="s", utc=True)
    day5 = (ts >= DAY0 + timedelta(days=5)) & (ts < DAY0 + timedelta(days=6))
    changed = events.drop(index=events.index[day5][:3])
    _write_source(tmp_path / "src2", "partitioned", changed)
    result = _run(settings, _config(str(tmp_path / "src2" / "source")), 6)
    assert result["history_partitions_written"] == 3 and result["history_partitions_deleted"] == 0

    after = _history_bytes(settings)
    assert after.keys() == before.keys()
    differ = sorted(key for key in after if after[key] != before[key])
    assert differ == [history.partition_key("acme", (DAY0 + timedelta(days=5)).date())]
    # other runs' outputs are untouched; the rerun's own output lost exactly the 3 events
    assert all(_run_output(settings, src, k) == runs_before[k] for k in range(1, DAYS + 1) if k != 6)
    rerun = RunContext(config=_config(src), interval_end=_end(6), settings=settings)
    assert len(rerun.read_parquet(paths.INTERACTIONS)) == len(codecs_read(runs_before[6])) - 3


def _run_output(settings, src, k) -> bytes:
    ctx = RunContext(config=_config(src), interval_end=_end(k), settings=settings)
    return ctx.store.get(ctx.key(paths.INTERACTIONS))


def codecs_read(blob: bytes) -> pd.DataFrame:
    from pipeline.storage import codecs

    return codecs.read_parquet(blob)


@pytest.mark.parametrize("layout", ["partitioned", "file"])
def test_late_events_inside_the_lookback_land_in_their_day_older_ones_are_counted(tmp_path, mlflow_uri, events, layout):
    settings = _settings(tmp_path, mlflow_uri, "root")
    ts = pd.to_datetime(events["timestamp"], unit="s", utc=True)
    for k in range(1, 7):
        src = _write_source(tmp_path / "src", layout, events[ts < _end(k)])
        _run(settings, _config(src), k)
    before = _history_bytes(settings)

    # before run 7 (interval day 6; lookback 2 -> days 4..6 rewritten) two events arrive late:
    # one of day 4 (inside the window) and one of day 2 (too old)
    late = pd.DataFrame(
        {
            "user_id": ["late-user", "late-user"],
            "item_id": ["i1", "i2"],
            "timestamp": [int((DAY0 + timedelta(days=d, hours=12)).timestamp()) for d in (4, 2)],
            "rating": [5.0, 5.0],
            "event_type": ["purchase", "purchase"],
        }
    )
    now = pd.concat([events[ts < _end(7)], late], ignore_index=True)
    if layout == "partitioned":  # partitions by arrival date: the late rows sit in today's folder
        src = _write_source(tmp_path / "src", layout, events[ts < _end(7)])
        late.to_parquet(tmp_path / "src" / "source" / f"dt={(DAY0 + timedelta(days=6)).date()}" / "late.parquet")
    else:
        src = _write_source(tmp_path / "src", layout, now)
    result = _run(settings, _config(src), 7)
    assert result["late_dropped"] == 1

    after = _history_bytes(settings)
    day = {d: history.partition_key("acme", (DAY0 + timedelta(days=d)).date()) for d in range(DAYS)}
    assert after[day[2]] == before[day[2]]  # too old: dropped, the partition is untouched
    assert after[day[4]] != before[day[4]]
    hist4 = codecs_read(after[day[4]])
    assert (hist4["user_id"] == "late-user").sum() == 1
    assert all(after[day[d]] == before[day[d]] for d in (0, 1, 3, 5))
    ctx = RunContext(config=_config(src), interval_end=_end(7), settings=settings)
    assert (ctx.read_parquet(paths.INTERACTIONS)["user_id"] == "late-user").sum() == 1


def test_a_gap_in_the_runs_is_caught_up_and_the_first_run_bootstraps(tmp_path, mlflow_uri, events):
    src = _write_source(tmp_path / "src", "partitioned", events)
    every = _settings(tmp_path, mlflow_uri, "every")
    for k in range(1, 9):
        _run(every, _config(src), k)

    gap = _settings(tmp_path, mlflow_uri, "gap")
    first = _run(gap, _config(src), 1)
    assert first["bootstrap"] and first["window_start"] is None
    second = _run(gap, _config(src), 8)  # a paused DAG with catchup off: days 1..6 never ran
    assert second["caught_up"] and second["window_start"] == (DAY0 + timedelta(days=1)).isoformat()
    assert second["history_partitions_written"] == 7
    assert _history_bytes(gap) == _history_bytes(every)


def test_a_non_midnight_interval_end_keeps_its_partial_day_out_of_the_history(tmp_path, mlflow_uri, events):
    settings = _settings(tmp_path, mlflow_uri, "root")
    src = _write_source(tmp_path / "src", "file", events)
    _run(settings, _config(src), 3)
    ctx = RunContext(config=_config(src), interval_end=_end(3), settings=settings)
    out = ctx.read_parquet(paths.INTERACTIONS)
    day3 = (DAY0 + timedelta(days=3)).date()
    assert (out["timestamp"].dt.date == day3).sum() > 0  # the first 2 hours of day 3 are trained on
    assert out["timestamp"].max() < pd.Timestamp(_end(3))
    assert day3 not in history.partitions(ctx.store, "acme")  # ... but written whole by the next run
    _run(settings, _config(src), 4)
    assert day3 in history.partitions(ctx.store, "acme")


def test_interval_start_defaults_to_the_schedule_and_lookback_zero_rewrites_one_day(tmp_path, mlflow_uri, events):
    settings = _settings(tmp_path, mlflow_uri, "root")
    src = _write_source(tmp_path / "src", "partitioned", events)
    cfg = _config(src, lookback_days=0)
    for k in range(1, 5):
        ctx = RunContext(config=cfg, interval_end=_end(k), settings=settings)  # no interval_start: the CLI
        result = extract.extract(ctx)
    assert result["interval_start"] == _end(3).isoformat()  # the previous 02:00 tick
    assert result["window_start"] == (DAY0 + timedelta(days=3)).isoformat()
    assert result["history_partitions_written"] == 1 and result["files"] == 2  # day 3 + day 4's first hours
