"""The event log's keys, its arrival filing and its retry rule, without a pipeline run."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pandas as pd

from pipeline.data import erased, event_log
from pipeline.storage import codecs, open_store, paths

T0 = datetime(2026, 3, 10, 9, tzinfo=UTC)


def _events(users, event_ids=None, stamps=None) -> pd.DataFrame:
    n = len(users)
    stamps = stamps or [T0] * n
    df = pd.DataFrame(
        {
            "user_id": pd.Series(users, dtype="string"),
            "item_id": pd.Series(["i1"] * n, dtype="string"),
            "timestamp": pd.to_datetime(stamps, utc=True),
            "event_type": pd.Series(["click"] * n, dtype="string"),
        }
    )
    ids = pd.Series(event_ids or [None] * n, dtype="string")
    given = pd.Series(pd.to_datetime(stamps, utc=True))
    df["event_key"] = event_log.event_keys(df["user_id"], df["item_id"], df["event_type"], given, ids)
    return df


def test_keys_prefer_the_event_id_then_the_client_timestamp():
    users = pd.Series(["a", "a", "a", "b"], dtype="string")
    items = pd.Series(["x"] * 4, dtype="string")
    types = pd.Series(["click"] * 4, dtype="string")
    ts = pd.Series(pd.to_datetime([T0, T0, None, T0], utc=True))
    ids = pd.Series(["e1", None, None, None], dtype="string")
    keys = event_log.event_keys(users, items, types, ts, ids)
    assert keys[0] == "id:e1" and keys[1].startswith("ts:") and pd.isna(keys[2])
    assert keys[1] != keys[3]  # another user
    again = event_log.event_keys(users, items, types, ts, pd.Series([None] * 4, dtype="string"))
    assert again[1] == keys[1]  # the same event, posted again: the same key


def test_the_retry_rule_does_not_depend_on_where_the_read_starts(tmp_path):
    store = open_store(str(tmp_path))
    batch = _events(["a", "b"], ["e1", "e2"])
    for day in (0, 1, 4):  # the first delivery, a retry the next day, one three days after that
        event_log.append(store, "acme", batch, received_at=T0 + timedelta(days=day))
    assert len(store.list(paths.events_prefix("acme"))) == 3
    whole = event_log.read(store, "acme", T0 + timedelta(days=5))
    # day 1 repeats day 0; day 4 is more than DEDUP_DAYS after its predecessor: kept
    assert sorted(whole["received_at"].dt.day.tolist()) == [10, 10, 14, 14]
    for start in range(0, 5):
        begin = T0.replace(hour=0) + timedelta(days=start)
        part = event_log.read(store, "acme", T0 + timedelta(days=5), start=begin)
        assert part.equals(whole[whole["received_at"] >= pd.Timestamp(begin)].reset_index(drop=True)), start


def test_arrival_filing_and_old_objects(tmp_path):
    store = open_store(str(tmp_path))
    old = _events(["late"], stamps=[datetime(2024, 1, 1, tzinfo=UTC)])
    event_log.append(store, "acme", old, received_at=T0)
    assert store.list(paths.events_prefix("acme"))[0].split("/")[3] == "dt=2026-03-10"
    # an object written before received_at existed: read as received at its event time
    legacy = pd.DataFrame({"user_id": ["x"], "item_id": ["y"], "timestamp": pd.to_datetime(["2026-03-09T08:00Z"])})
    store.put(f"{paths.events_prefix('acme')}/dt=2026-03-09/legacy.parquet", codecs.parquet_bytes(legacy))
    got = event_log.read(store, "acme", T0 + timedelta(hours=1))
    assert got["user_id"].tolist() == ["x", "late"] and got["timestamp"].iloc[1].year == 2024
    assert len(event_log.read(store, "acme", T0)) == 1  # "late" arrives at T0, not before


def test_erased_list_is_hashes_and_only_grows(tmp_path):
    store = open_store(str(tmp_path))
    assert erased.add(store, "acme", "alice") and not erased.add(store, "acme", "alice")
    assert erased.add(store, "acme", "bob")
    assert b"alice" not in store.get(erased.key("acme"))
    mask = erased.erased_mask(pd.Series(["bob", "carol", None, "alice"], dtype="string"), erased.hashes(store, "acme"))
    assert mask.tolist() == [True, False, False, True]
