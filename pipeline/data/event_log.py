"""The tenant's event log: events POSTed to the serving API, read back by the next extract.

`tenants/{t}/events/dt=YYYY-MM-DD/{digest}.parquet`: one object per accepted batch, filed
under the UTC day the API RECEIVED it (`received_at`); the event's own `timestamp` is kept as
data. Filing by arrival is what keeps late events: an event stamped a year ago that arrives
today lands in today's folder, so the next run reads it, wherever its timestamp falls. Reads
select by arrival (`received_at < end`), so a rerun of an interval reads exactly the events
that had arrived by its end, however many arrived since: the same release unless the
window's data changed.

Retries are stored once. Every event gets a key (`event_key`): `id:<event_id>` when the
client sent one, else `ts:<sha256(user, item, type, timestamp)>` when it sent a timestamp,
else none (an event with neither is stamped with the receive time and cannot be told apart
from a new one: not deduplicated). At write, a batch whose events all have keys is named by
those keys, so a retry the same day finds its object already there; at read, an event whose
key arrived earlier (within `DEDUP_DAYS` before its own arrival day) is dropped, which
catches retries across midnight. The rule looks back a fixed number of days, so whichever
run reads a day decides the same (nightly runs and a backfill write the same history).

Objects written before `received_at` existed are read as received at their event time (they
were filed under their event date) and without a key.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta

import numpy as np
import pandas as pd

from pipeline.storage import ObjectStore, codecs, paths

COLUMNS = [
    "user_id", "item_id", "timestamp", "rating", "event_type", "event_key", "received_at",
    "recommendation_id", "position",  # attribution to a served response (experiment reports); null if not sent
]  # fmt: skip
DEDUP_DAYS = 2
_US = "datetime64[us, UTC]"


def event_keys(
    user_id: pd.Series, item_id: pd.Series, event_type: pd.Series, timestamp: pd.Series, event_id: pd.Series
) -> pd.Series:
    """The dedup key of each event (None where there is neither an event_id nor a timestamp)."""
    ts = pd.to_datetime(timestamp, utc=True)
    stamp = pd.Series(ts.dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), index=user_id.index)
    parts = user_id.astype("string") + "\x1f" + item_id.astype("string") + "\x1f" + event_type.astype("string")
    text = parts + "\x1f" + stamp
    hashed = text.map(lambda s: None if pd.isna(s) else "ts:" + hashlib.sha256(s.encode()).hexdigest()[:32])
    ids = event_id.astype("string")
    out = ("id:" + ids).where(ids.notna(), hashed.where(ts.notna(), None))
    return out.astype("string")


def _frame(events: pd.DataFrame) -> pd.DataFrame:
    n = pd.RangeIndex(len(events))
    events = events.reset_index(drop=True)
    ts = pd.to_datetime(events["timestamp"], utc=True).astype(_US)
    received = pd.to_datetime(events["received_at"], utc=True).fillna(ts) if "received_at" in events else ts
    return pd.DataFrame(
        {
            "user_id": events["user_id"].astype("string"),
            "item_id": events["item_id"].astype("string"),
            "timestamp": ts,
            "rating": pd.to_numeric(events.get("rating", pd.Series(np.nan, index=n)), errors="coerce").astype(float),
            "event_type": events.get("event_type", pd.Series("interaction", index=n)).astype("string"),
            "event_key": events.get("event_key", pd.Series(pd.NA, index=n, dtype="string")).astype("string"),
            "received_at": received.astype(_US),
            "recommendation_id": events.get("recommendation_id", pd.Series(pd.NA, index=n)).astype("string"),
            "position": pd.to_numeric(events.get("position", pd.Series(pd.NA, index=n))).astype("Int64"),
        }
    )


def append(store: ObjectStore, tenant: str, events: pd.DataFrame, received_at: datetime | None = None) -> list[str]:
    """Write `events` (user_id, item_id, timestamp[, rating, event_type, event_key]) received at
    `received_at` (the API's clock; None: each event's own timestamp, i.e. an import of past
    events filed as if they had arrived on time). Returns the keys written or found."""
    df = events.copy()
    if received_at is not None:
        df["received_at"] = pd.Timestamp(received_at)
    df = _frame(df)
    df = df.sort_values(["received_at", "timestamp", "user_id", "item_id"], kind="stable").reset_index(drop=True)
    keys = []
    for day, part in df.groupby(df["received_at"].dt.strftime("%Y-%m-%d"), sort=True):
        part = part.reset_index(drop=True)
        data = codecs.parquet_bytes(part)
        if part["event_key"].notna().all():  # a retry of this batch today has the same name
            name = hashlib.sha256("\n".join(sorted(part["event_key"])).encode()).hexdigest()[:24]
        else:
            name = hashlib.sha256(data).hexdigest()[:24]
        key = f"{paths.events_prefix(tenant)}/dt={day}/{name}.parquet"
        if not store.exists(key):
            store.put(key, data)
        keys.append(key)
    return keys


def keys_for_days(store: ObjectStore, tenant: str, first_day: str, last_day: str) -> list[str]:
    """The log's objects filed under days first_day..last_day (ISO dates; "" = from the start)."""
    prefix = paths.events_prefix(tenant) + "/"
    return sorted(k for k in store.list(prefix) if k.endswith(".parquet") and first_day <= _day(k, prefix) <= last_day)


def read(store: ObjectStore, tenant: str, end: datetime, start: datetime | None = None) -> pd.DataFrame:
    """Every logged event RECEIVED in [start, end) (no start: all before end), duplicates of an
    earlier arrival dropped (see the module docstring), in a stable order (empty frame when
    none). Only the day folders of that range, plus DEDUP_DAYS before it, are downloaded."""
    last_day = pd.Timestamp(end).strftime("%Y-%m-%d")
    lead = None if start is None else pd.Timestamp(start) - timedelta(days=DEDUP_DAYS)
    keys = keys_for_days(store, tenant, "" if lead is None else lead.strftime("%Y-%m-%d"), last_day)
    if not keys:
        return _frame(pd.DataFrame({c: pd.Series(dtype="object") for c in COLUMNS[:3]}))
    df = _frame(pd.concat([codecs.read_parquet(store.get(k)) for k in keys], ignore_index=True))
    df = df.sort_values(["received_at"], kind="stable").reset_index(drop=True)  # objects in key order within a time
    df = df[~_repeats(df)]
    keep = df["received_at"] < pd.Timestamp(end)
    if start is not None:
        keep &= df["received_at"] >= pd.Timestamp(start)
    return df[keep].reset_index(drop=True)


def _repeats(df: pd.DataFrame) -> pd.Series:
    """Rows whose key arrived before (an earlier row of the same key, at most DEDUP_DAYS whole
    days earlier by arrival day). Each row is judged by its predecessor only, so the answer
    does not depend on how far back the read started, as long as it covers DEDUP_DAYS."""
    keyed = df["event_key"].notna()
    if not keyed.any():
        return pd.Series(False, index=df.index)
    sub = df.loc[keyed, ["event_key", "received_at"]]
    order = sub.sort_values(["event_key", "received_at"], kind="stable")  # stable: arrival, then object order
    day = order["received_at"].dt.floor("D")
    same = order["event_key"].eq(order["event_key"].shift())
    close = (day - day.shift()) <= pd.Timedelta(days=DEDUP_DAYS)
    out = pd.Series(False, index=df.index)
    out.loc[order.index] = (same & close).to_numpy()
    return out


def _day(key: str, prefix: str) -> str:
    part = key[len(prefix) :].split("/", 1)[0]
    return part[3:] if part.startswith("dt=") else ""
