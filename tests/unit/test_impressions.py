"""The impression logger: durable across restarts, survives storage hiccups, bounded, never raises."""

from __future__ import annotations

from datetime import UTC, datetime

import pandas as pd
from prometheus_client import CollectorRegistry

from pipeline.serving import impressions
from pipeline.storage import codecs, open_store

T0 = datetime(2026, 5, 1, 23, 59, 59, tzinfo=UTC)


def _row(i: int, when: datetime = T0, tenant: str = "acme") -> dict:
    return impressions.record(tenant, f"r{i}", f"u{i}", "rel-1", ["a", "b"], when, experiment="e", variant="x")


def _read(store, tenant="acme") -> pd.DataFrame:
    keys = sorted(store.list(impressions.prefix(tenant) + "/"))
    return pd.concat([codecs.read_parquet(store.get(k)) for k in keys], ignore_index=True) if keys else pd.DataFrame()


class Flaky:
    """An object store whose puts fail while `down` (a storage hiccup)."""

    def __init__(self, inner, down: int = 0) -> None:
        self.inner, self.down, self.attempts = inner, down, 0

    def put(self, key, data):
        self.attempts += 1
        if self.down:
            self.down -= 1
            raise ConnectionError("store unreachable")
        self.inner.put(key, data)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_impressions_survive_a_restart_and_are_filed_by_day(tmp_path):
    store = open_store(str(tmp_path))
    first = impressions.ImpressionLogger(store, batch=3, flush_seconds=0.05)
    first.start()
    for i in range(5):
        assert first.log(_row(i, T0 if i < 4 else T0.replace(day=2, hour=0, second=1)))
    assert first.close() == 0
    second = impressions.ImpressionLogger(store, batch=100, flush_seconds=0.05)  # the restarted server
    second.start()
    for i in range(5, 8):
        second.log(_row(i))
    assert second.close() == 0
    df = _read(store)
    assert sorted(df["recommendation_id"]) == [f"r{i}" for i in range(8)]
    assert list(df.loc[df["recommendation_id"] == "r0", "items"].iloc[0]) == ["a", "b"]
    days = {impressions.day_of(k) for k in store.list(impressions.prefix("acme") + "/")}
    assert days == {"2026-05-01", "2026-05-02"}
    assert first.writer != second.writer


def test_a_storage_hiccup_loses_nothing(tmp_path):
    store = Flaky(open_store(str(tmp_path)), down=3)
    reg = CollectorRegistry()
    logger = impressions.ImpressionLogger(store, reg, batch=2, flush_seconds=0.02, retry_seconds=0.01)
    logger.start()
    for i in range(6):
        assert logger.log(_row(i))
    assert logger.close(timeout=5) == 0
    assert sorted(_read(store)["recommendation_id"]) == [f"r{i}" for i in range(6)]
    assert reg.get_sample_value("recsys_impression_write_failures_total") == 3
    assert reg.get_sample_value("recsys_impressions_total", {"tenant": "acme"}) == 6


def test_memory_is_bounded_and_drops_are_counted(tmp_path):
    store = Flaky(open_store(str(tmp_path)), down=10**9)  # storage down for good
    reg = CollectorRegistry()
    logger = impressions.ImpressionLogger(store, reg, capacity=10, batch=4, flush_seconds=0.01, retry_seconds=0.01)
    logger.start()
    accepted = [logger.log(_row(i)) for i in range(15)]
    assert accepted == [True] * 10 + [False] * 5
    assert reg.get_sample_value("recsys_impressions_dropped_total", {"tenant": "acme"}) == 5
    assert logger.close(timeout=0.2) == 10  # still down at shutdown: reported, not raised


def test_a_bad_row_is_dropped_not_retried_forever(tmp_path):
    store = open_store(str(tmp_path))
    reg = CollectorRegistry()
    logger = impressions.ImpressionLogger(store, reg, batch=10, flush_seconds=0.01)
    logger.start()
    assert logger.log(_row(1))
    assert logger.log({**_row(2), "items": 5})  # not a list: cannot be encoded
    assert logger.log(_row(3, tenant="other"))
    assert logger.close() == 0
    assert list(_read(store, "other")["recommendation_id"]) == ["r3"]
    assert reg.get_sample_value("recsys_impressions_dropped_total", {"tenant": "acme"}) == 2
