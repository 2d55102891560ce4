"""The tenant's event log: events POSTed to the serving API, read back by the next extract.

`tenants/{t}/events/dt=YYYY-MM-DD/{digest}.parquet`: one object per accepted batch and
event date, named by the sha256 of its content, so a client retry rewrites the same object
(idempotent) and a rerun of extract for an interval reads exactly the same events. Only
events strictly before the interval's end are read, like the tenant's own source.
"""

from __future__ import annotations

import hashlib
from datetime import datetime

import pandas as pd

from pipeline.storage import ObjectStore, codecs, paths

COLUMNS = ["user_id", "item_id", "timestamp", "rating", "event_type"]


def _frame(events: pd.DataFrame) -> pd.DataFrame:
    df = pd.DataFrame(
        {
            "user_id": events["user_id"].astype("string"),
            "item_id": events["item_id"].astype("string"),
            "timestamp": pd.to_datetime(events["timestamp"], utc=True).astype("datetime64[us, UTC]"),
            "rating": pd.to_numeric(
                events.get("rating", pd.Series(float("nan"), index=events.index)), errors="coerce"
            ).astype("float64"),
            "event_type": events.get("event_type", pd.Series("interaction", index=events.index)).astype("string"),
        }
    )
    return df.sort_values(["timestamp", "user_id", "item_id"], kind="stable").reset_index(drop=True)


def append(store: ObjectStore, tenant: str, events: pd.DataFrame) -> list[str]:
    """Write `events` (user_id, item_id, timestamp[, rating, event_type]); returns the keys written."""
    df = _frame(events)
    keys = []
    for day, part in df.groupby(df["timestamp"].dt.strftime("%Y-%m-%d"), sort=True):
        data = codecs.parquet_bytes(part.reset_index(drop=True))
        key = f"{paths.events_prefix(tenant)}/dt={day}/{hashlib.sha256(data).hexdigest()[:24]}.parquet"
        if not store.exists(key):
            store.put(key, data)
        keys.append(key)
    return keys


def read(store: ObjectStore, tenant: str, end: datetime, start: datetime | None = None) -> pd.DataFrame:
    """Every logged event with start <= timestamp < end (no start: all before end), in a stable
    order (empty frame when none). Only the day folders of that range are downloaded."""
    prefix = paths.events_prefix(tenant) + "/"
    last_day = pd.Timestamp(end).strftime("%Y-%m-%d")
    first_day = "" if start is None else pd.Timestamp(start).strftime("%Y-%m-%d")
    keys = sorted(k for k in store.list(prefix) if k.endswith(".parquet") and first_day <= _day(k, prefix) <= last_day)
    if not keys:
        return _frame(pd.DataFrame({c: pd.Series(dtype="object") for c in COLUMNS[:3]}))
    df = pd.concat([codecs.read_parquet(store.get(k)) for k in keys], ignore_index=True)
    df = _frame(df)
    keep = df["timestamp"] < pd.Timestamp(end)
    if start is not None:
        keep &= df["timestamp"] >= pd.Timestamp(start)
    return df[keep].reset_index(drop=True)


def _day(key: str, prefix: str) -> str:
    part = key[len(prefix) :].split("/", 1)[0]
    return part[3:] if part.startswith("dt=") else ""
