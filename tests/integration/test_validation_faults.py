"""A seeded-fault corpus through the real stages: thirty clean daily partitions pass with no
alarm at all; each seeded fault is caught, with a message a data engineer understands.

The tenant: `pipeline.samples.synthetic` (long-tailed items, log-normal users, ~800 events/day)
over 30 days, delivered as Hive partitions `source/dt=YYYY-MM-DD/part.csv`. Day d's partition
arrives, then the run for [day d, day d+1) runs extract + validate, as the nightly DAG would,
so the volume history is real. Each fault is seeded into day 10's partition of a copy of the
state after days 0..9 (ten runs of history). The full thirty days are the `slow` test.
"""

from __future__ import annotations

import re
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline.config import load_tenant_file
from pipeline.context import RunContext, StageError
from pipeline.data import extract
from pipeline.samples import synthetic
from pipeline.storage import codecs, paths
from pipeline.validation import stage as validate
from tests.conftest import isolated_settings

pytestmark = pytest.mark.integration

DAY0 = datetime(2025, 1, 1, tzinfo=UTC)
DAYS = 30
FAULT_DAY = 10
NON_UTF8 = "caf\xe9".encode("latin-1")  # 'café' in Latin-1: not valid UTF-8


def partitions() -> dict[int, pd.DataFrame]:
    """30 clean daily partitions of one realistic synthetic tenant: {day index: events}."""
    df = synthetic.interactions(n_users=800, n_items=400, mean_events=25, seed=7, start="2025-01-01", days=DAYS)
    day = (df["timestamp"] - int(DAY0.timestamp())) // 86_400
    return {d: part.reset_index(drop=True) for d, part in df.groupby(day)}


class Tenant:
    """A tenant under `root`: its partitioned source, its config, its runs."""

    def __init__(self, root: Path, mlflow_uri: str) -> None:
        self.root = root
        self.settings = isolated_settings(root, mlflow_uri)
        doc = {
            "tenant": "shop",
            "schedule": "0 0 * * *",  # daily at midnight: the interval is one partition's day
            "source": {"uri": "source", "columns": {"rating": "rating"}},
        }
        (root / "tenants" / "shop.yaml").write_text(yaml.safe_dump(doc))

    def partition(self, day: int) -> Path:
        path = self.root / "source" / f"dt={(DAY0 + timedelta(days=day)).date().isoformat()}" / "part.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def deliver(self, day: int, events: pd.DataFrame) -> None:
        events.to_csv(self.partition(day), index=False)

    def context(self, day: int) -> RunContext:
        cfg = load_tenant_file(self.root / "tenants" / "shop.yaml")
        start = DAY0 + timedelta(days=day)
        return RunContext(
            config=cfg, interval_start=start, interval_end=start + timedelta(days=1), settings=self.settings
        )

    def run(self, day: int) -> tuple[RunContext, dict]:
        ctx = self.context(day)
        extract.extract(ctx)
        return ctx, validate.validate(ctx)

    def expectations(self, doc: dict) -> None:
        folder = self.settings.expectations_dir
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "shop.yaml").write_text(yaml.safe_dump(doc))


def report(ctx: RunContext) -> dict:
    return codecs.read_json(ctx.store.get(ctx.key(paths.VALIDATION_REPORT)))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, mlflow_uri):
    """Days 0..9 delivered and run in order: the clean history every fault starts from."""
    parts = partitions()
    tenant = Tenant(tmp_path_factory.mktemp("clean"), mlflow_uri)
    results = []
    for day in range(FAULT_DAY):
        tenant.deliver(day, parts[day])
        results.append(tenant.run(day))
    return {"parts": parts, "tenant": tenant, "results": results}


def _copy(tenant: Tenant, root: Path, mlflow_uri: str) -> Tenant:
    shutil.copytree(tenant.root, root)
    return Tenant(root, mlflow_uri)


@pytest.fixture
def faulty(corpus, tmp_path, mlflow_uri):
    """A copy of the tenant after days 0..9, whose day-10 partition the test seeds with a fault."""
    return _copy(corpus["tenant"], tmp_path / "tenant", mlflow_uri), corpus["parts"][FAULT_DAY].copy()


def _assert_clean(ctx: RunContext, result: dict) -> None:
    rep = report(ctx)
    assert result["success"] and result["failed"] == 0 and result["warnings"] == 0, rep["warnings"] + rep["failures"]
    assert 700 < result["interval_events"] < 900


def test_ten_clean_daily_partitions_pass_with_zero_false_alarms(corpus):
    for ctx, result in corpus["results"]:
        _assert_clean(ctx, result)


@pytest.mark.slow
def test_thirty_clean_daily_partitions_pass_with_zero_false_alarms(corpus, tmp_path, mlflow_uri):
    tenant = _copy(corpus["tenant"], tmp_path / "tenant", mlflow_uri)
    results = list(corpus["results"])
    for day in range(FAULT_DAY, DAYS):
        tenant.deliver(day, corpus["parts"][day])
        results.append(tenant.run(day))
    assert len(results) == DAYS
    for ctx, result in results:
        _assert_clean(ctx, result)
    ctx, _ = results[-1]
    statuses = {c["check"]: c["status"] for c in report(ctx)["checks"]}
    # every check that applies to this tenant ran and passed (the volume check had its history)
    for check in ("schema", "not_null", "duplicates", "empty_interval", "volume", "bot_users", "future_timestamps"):
        assert statuses[check] == "pass", check
    assert len(report(ctx)["volume_history"]) == 7


def _blocked(tenant: Tenant) -> str:
    with pytest.raises(validate.ValidationFailed) as err:
        tenant.run(FAULT_DAY)
    return str(err.value)


def test_schema_drift_renamed_column_is_caught_at_extract(faulty):
    tenant, events = faulty
    tenant.deliver(FAULT_DAY, events.rename(columns={"user_id": "customer_id"}))
    with pytest.raises(StageError) as err:
        tenant.run(FAULT_DAY)
    msg = str(err.value)
    assert "dt=2025-01-11/part.csv: column 'user_id' (source.columns.user_id) not found" in msg
    assert "'customer_id'" in msg  # the columns present, so the rename is obvious


def test_schema_drift_missing_column_is_caught_at_extract(faulty):
    tenant, events = faulty
    tenant.deliver(FAULT_DAY, events.drop(columns=["rating"]))
    with pytest.raises(StageError, match=r"column 'rating' \(source.columns.rating\) not found"):
        tenant.run(FAULT_DAY)


def test_schema_drift_wrong_type_is_caught(faulty):
    tenant, events = faulty
    ts = pd.to_datetime(events["timestamp"], unit="s", utc=True)
    tenant.deliver(FAULT_DAY, events.assign(timestamp=ts.dt.strftime("%d/%m/%Y %H:%M")))  # not epoch, not ISO
    msg = _blocked(tenant)
    assert "not_null [blocking] expect_column_values_to_not_be_null on timestamp" in msg
    # every timestamp of the new partition (the rows this run read: days 8..10, lookback included)
    assert f"{len(events):,} of " in msg and "are null (timestamps that could not be parsed" in msg


def test_five_percent_duplicates_are_caught(faulty):
    tenant, events = faulty
    dup = events.sample(frac=0.05, random_state=1)
    tenant.deliver(FAULT_DAY, pd.concat([events, dup], ignore_index=True))
    msg = _blocked(tenant)
    n = len(events) + len(dup)
    assert "duplicates [blocking] expect_compound_columns_to_be_unique on ['user_id', 'item_id', 'timestamp'" in msg
    assert f"{2 * len(dup):,} of {n:,} events in the interval" in msg
    assert "share (user_id, item_id, timestamp, event_type) with another event; at most 1.00% allowed" in msg


def test_an_empty_partition_is_caught(faulty):
    tenant, events = faulty
    tenant.deliver(FAULT_DAY, events.head(0))
    msg = _blocked(tenant)
    assert "volume [blocking] expect_table_row_count_to_be_between: 0 events in [2025-01-11T00:00:00Z, " in msg
    assert "-100% vs the median of the previous 7 runs" in msg
    assert "(warning) empty_interval: " in msg
    assert "no events in the data interval [2025-01-11T00:00:00Z, 2025-01-12T00:00:00Z)" in msg


def test_volume_down_sixty_percent_is_caught(faulty):
    tenant, events = faulty
    kept = events.sample(frac=0.4, random_state=2).sort_values("timestamp")
    tenant.deliver(FAULT_DAY, kept)
    msg = _blocked(tenant)
    assert f"volume [blocking] expect_table_row_count_to_be_between: {len(kept):,} events in [2025-01-11" in msg
    assert re.search(r"-6[01]% vs the median of the previous 7 runs \(\d+ events\)", msg)
    assert "a drop of at most 50% is allowed" in msg


def test_events_two_days_in_the_future_are_caught(faulty):
    tenant, events = faulty
    future = events.sample(frac=0.05, random_state=3).index
    events.loc[future, "timestamp"] += 2 * 86_400
    tenant.deliver(FAULT_DAY, events)
    msg = _blocked(tenant)
    assert "future_timestamps [blocking]" in msg
    assert (
        f"{len(future):,} events in this interval's own source partitions are stamped at or after the interval "
        "end 2025-01-12T00:00:00Z (extract dropped them)"
    ) in msg


def test_a_bot_at_ten_thousand_events_per_hour_is_flagged_and_can_be_filtered(faulty):
    tenant, events = faulty
    hour = int((DAY0 + timedelta(days=FAULT_DAY, hours=14)).timestamp())
    n = 10_000
    bot = pd.DataFrame(
        {
            "user_id": "u-bot-1",
            "item_id": [f"i{i % 400}" for i in range(n)],
            "timestamp": hour + np.arange(n) * 3600 / n,  # 10,000 events within one hour
            "rating": 5.0,
        }
    )
    tenant.deliver(FAULT_DAY, pd.concat([events, bot], ignore_index=True))
    ctx, result = tenant.run(FAULT_DAY)  # a warning by default: flagged, the run goes on
    assert result["success"] and result["warnings"] == 1
    [warning] = report(ctx)["warnings"]
    assert warning.startswith("bot_users: ")
    assert "1 user(s) with more than 1,000 events in one hour (bot-like): u-bot-1 (10,000 events in the hour " in (
        warning
    )
    assert "from 2025-01-11T14:00:00Z" in warning

    tenant.expectations({"bot_users": {"filter": True}})  # the tenant opts in to filtering
    result = validate.validate(ctx)
    assert result["filtered_rows"] == n and result["warnings"] == 1
    assert "their 10,000 events are removed from the table downstream reads" in report(ctx)["warnings"][0]
    assert set(ctx.read_parquet(paths.EXCLUDED_USERS)["user_id"]) == {"u-bot-1"}  # features drops their events


def test_non_utf8_bytes_are_caught_at_extract(faulty):
    tenant, events = faulty
    path = tenant.partition(FAULT_DAY)
    tenant.deliver(FAULT_DAY, events)
    data = path.read_bytes()
    cut = data.index(b"\n", len(data) // 2) + 1
    path.write_bytes(data[:cut] + b"u1," + NON_UTF8 + b",1736600000,3.0\n" + data[cut:])
    with pytest.raises(StageError) as err:
        tenant.run(FAULT_DAY)
    msg = str(err.value)
    assert "dt=2025-01-11/part.csv: not valid UTF-8 (" in msg
