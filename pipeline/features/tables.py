"""User and item feature tables as of a run's interval end (offline Parquet, online subset in Redis).

Computed from the interactions up to the interval end with grouped, vectorised pandas
operations (no loop over rows). Windows are counted back from `as_of` (the interval end),
never from the wall clock, so a rerun gives the same tables.

User features: events in the last 7 and 30 days, all events, days since the last event,
average rating (NaN without ratings), distinct categories interacted with (catalog).
Item features: distinct users (popularity), events in the last 7 / 30 days, trend (the 7-day
rate over the 30-day rate, add-one smoothed: > 1 means rising), age in days since the first
event, and the catalog's category and tag count.
"""

from __future__ import annotations

from datetime import datetime

import numpy as np
import pandas as pd

# The numeric columns copied to Redis per user (float32, in this order) by the refresh.
ONLINE_USER_FEATURES = ("events_7d", "events_30d", "events_total", "days_since_last", "avg_rating")
DAY = np.timedelta64(86_400_000_000, "us")


def _ages(ts: pd.Series, as_of: datetime) -> np.ndarray:
    stamps = ts.dt.tz_convert("UTC") if getattr(ts.dt, "tz", None) is not None else ts.dt.tz_localize("UTC")
    end = pd.Timestamp(as_of).tz_convert("UTC") if pd.Timestamp(as_of).tzinfo else pd.Timestamp(as_of, tz="UTC")
    return ((end - stamps).to_numpy("timedelta64[us]") / DAY).astype(np.float64)


def _aged(events: pd.DataFrame, columns: list[str], as_of: datetime) -> pd.DataFrame:
    """The columns plus each event's age in days and whether it falls in the 7/30-day windows."""
    df = events[columns].copy()
    df["age"] = _ages(df["timestamp"], as_of)
    df["in_7d"] = df["age"] <= 7
    df["in_30d"] = df["age"] <= 30
    return df


def user_features(events: pd.DataFrame, as_of: datetime, catalog: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per user_id: see the module docstring. `events` has user_id, item_id, timestamp, rating."""
    df = _aged(events, ["user_id", "item_id", "timestamp", "rating"], as_of)
    g = df.groupby("user_id", sort=True)
    out = pd.DataFrame(
        {
            "events_7d": g["in_7d"].sum().astype(np.int64),
            "events_30d": g["in_30d"].sum().astype(np.int64),
            "events_total": g.size().astype(np.int64),
            "days_since_last": g["age"].min(),
            "avg_rating": g["rating"].mean(),
        }
    )
    if catalog is not None and "category" in catalog:
        cats = df[["user_id", "item_id"]].merge(catalog[["item_id", "category"]], on="item_id", how="left")
        out["distinct_categories"] = cats.groupby("user_id", sort=True)["category"].nunique().astype(np.int64)
    else:
        out["distinct_categories"] = np.int64(0)
    return out.reset_index()


def item_features(events: pd.DataFrame, as_of: datetime, catalog: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per item_id (catalog items without events included, with zero counts)."""
    df = _aged(events, ["user_id", "item_id", "timestamp"], as_of)
    g = df.groupby("item_id", sort=True)
    out = pd.DataFrame(
        {
            "users": g["user_id"].nunique().astype(np.int64),
            "events_7d": g["in_7d"].sum().astype(np.int64),
            "events_30d": g["in_30d"].sum().astype(np.int64),
            "age_days": g["age"].max(),
        }
    )
    return finish_items(out, catalog)


def finish_items(out: pd.DataFrame, catalog: pd.DataFrame | None) -> pd.DataFrame:
    """The item table from its per-item aggregates (index item_id: users, events_7d, events_30d,
    age_days): trend and the catalog's attributes. Shared by the in-memory and out-of-core paths."""
    out["trend"] = (out["events_7d"] / 7 + 1 / 30) / (out["events_30d"] / 30 + 1 / 30)
    out = out.reset_index()
    if catalog is not None:
        attrs = catalog[["item_id", "category", "tags"]].copy()
        attrs["tag_count"] = attrs["tags"].str.len().fillna(0).astype(np.int64)
        out = out.merge(attrs[["item_id", "category", "tag_count"]], on="item_id", how="outer")
        counts = ["users", "events_7d", "events_30d"]
        out[counts] = out[counts].fillna(0).astype(np.int64)
        out["trend"] = out["trend"].fillna(1.0)
        out = out.sort_values("item_id", kind="stable").reset_index(drop=True)
    return out


def online_user_vectors(table: pd.DataFrame) -> np.ndarray:
    """float32 [users, len(ONLINE_USER_FEATURES)] in table order (NaN average rating kept as NaN)."""
    return table[list(ONLINE_USER_FEATURES)].to_numpy(dtype=np.float32)
