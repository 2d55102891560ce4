"""A tenant's interaction history: one Parquet partition per event date, written incrementally.

Layout: `tenants/{t}/history/dt=YYYY-MM-DD/part.parquet`, the raw events of that UTC day
(user_id, item_id, timestamp, rating, event_type), rows sorted on every column, so the same
events always give the same bytes. Days without events have no partition. "That day" is the
event's day for source rows and the ARRIVAL day for API events (pipeline/data/event_log.py),
so an API event stamped long ago is kept, in the partition of the day it came in.

Each run rewrites a window of whole days and nothing else (`plan`):

* normally the days from `interval_start`'s day minus `source.lookback_days` up to (not
  including) `interval_end`'s day: a rerun replaces exactly those partitions, and late
  events that fall inside the window land in their own day's partition;
* if the newest partition older than that window leaves a gap (runs were skipped, e.g. a
  paused DAG with catchup off), the window starts the day after it instead (catch-up);
* with no partition older than the window at all, the run bootstraps: it reads everything
  before `interval_end` and writes every day that has events.

Events of `interval_end`'s own day before `interval_end` (a schedule that is not at
midnight) reach the run's output but not the history: the next run writes that day whole.
Training reads the partitions before the window plus the window's fresh rows.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.storage import ObjectStore, paths

COLUMNS = ["user_id", "item_id", "timestamp", "rating", "event_type"]
PART = "part.parquet"
DEFAULT_EVENT_TYPE = "interaction"
SORT = ["timestamp", "user_id", "item_id", "event_type", "rating"]


def midnight(day: date) -> datetime:
    return datetime.combine(day, time(0), tzinfo=UTC)


def partition_key(tenant: str, day: date) -> str:
    return f"{paths.history_prefix(tenant)}/dt={day.isoformat()}/{PART}"


def partitions(store: ObjectStore, tenant: str) -> dict[date, str]:
    """Every history partition of the tenant: {event date: key}."""
    prefix = paths.history_prefix(tenant) + "/"
    out = {}
    for key in store.list(prefix):
        folder, _, name = key[len(prefix) :].partition("/")
        if name == PART and folder.startswith("dt="):
            try:
                out[date.fromisoformat(folder[3:])] = key
            except ValueError:
                continue
    return dict(sorted(out.items()))


def canonical(df: pd.DataFrame, sort: bool = True) -> pd.DataFrame:
    """History columns with fixed dtypes, sorted on every column (NaT/NA last): stable bytes."""
    out = pd.DataFrame(
        {
            "user_id": df["user_id"].astype("string"),
            "item_id": df["item_id"].astype("string"),
            "timestamp": pd.to_datetime(df["timestamp"], utc=True).astype("datetime64[us, UTC]"),
            "rating": pd.to_numeric(df["rating"], errors="coerce").astype("float64"),
            "event_type": df["event_type"].astype("string"),
        }
    )
    if not sort:
        return out.reset_index(drop=True)
    return out.sort_values(SORT, kind="stable", na_position="last").reset_index(drop=True)


def empty() -> pd.DataFrame:
    return canonical(pd.DataFrame({c: pd.Series(dtype="object") for c in COLUMNS}))


def read(store: ObjectStore, keys: list[str], threads: int = 8) -> pd.DataFrame:
    """The partitions `keys`, concatenated in the given order (fetched in parallel)."""
    if not keys:
        return empty()
    with ThreadPoolExecutor(max_workers=min(threads, len(keys))) as pool:
        tables = list(pool.map(lambda k: pq.read_table(pa.BufferReader(store.get(k))), keys))
    return pa.concat_tables(tables).to_pandas()  # one conversion: the dtypes come from the pandas metadata


@dataclass(frozen=True)
class Window:
    """What one run reads from its source and which history partitions it rewrites."""

    interval_start: datetime
    interval_end: datetime
    first_day: date | None  # first day rewritten; None: bootstrap (every day before end_day)
    end_day: date  # days before this one are complete and written; this day's rows are the tail
    caught_up: bool  # the window was extended back over a gap

    @property
    def bootstrap(self) -> bool:
        return self.first_day is None

    @property
    def start(self) -> datetime | None:
        """Rows at or after this instant are read and kept (None: everything)."""
        return None if self.first_day is None else midnight(self.first_day)

    @property
    def last_source_day(self) -> date:
        """The last day a date-partitioned source must be read for (the day of end - 1 us)."""
        return (self.interval_end - timedelta(microseconds=1)).date()

    def rewrites(self, day: date) -> bool:
        return day < self.end_day and (self.first_day is None or day >= self.first_day)


def plan(existing: list[date] | set[date], interval_start: datetime, interval_end: datetime, lookback_days: int):
    """The run's window (see the module docstring) from the dates of the existing partitions."""
    end_day = interval_end.astimezone(UTC).date()
    nominal = min(interval_start.astimezone(UTC).date(), end_day) - timedelta(days=lookback_days)
    prior = [d for d in existing if d < nominal]
    if not prior:
        return Window(interval_start, interval_end, None, end_day, False)
    first = max(prior) + timedelta(days=1)
    return Window(interval_start, interval_end, first, end_day, first < nominal)


def interval_start(schedule: str, interval_end: datetime, given: datetime | None = None) -> datetime:
    """The data interval's start: as given (Airflow's data_interval_start), else the schedule's
    previous tick before `interval_end` (croniter), else one day before it."""
    if given is not None and given < interval_end:
        return given
    try:
        from croniter import croniter

        prev = croniter(schedule, interval_end).get_prev(datetime)
        return prev.astimezone(UTC)
    except Exception:  # @once/@continuous presets or a cron croniter does not know
        return interval_end - timedelta(days=1)
