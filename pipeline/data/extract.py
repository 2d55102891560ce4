"""extract: read the tenant's source for the run's window, keep the interaction history, write
the run's interactions.

1. The window (`pipeline/data/history.py`): the days of the data interval plus `source.lookback_days`
   earlier ones (late events), extended back over a gap; everything before `interval_end` on
   the first run (bootstrap).
2. Read only that window where the source allows: a SQL query gets it as `:start`/`:end`, a
   date-partitioned folder or prefix is read only for its days; a plain file or folder is read
   whole and only the window's rows are kept. API events (`pipeline/data/event_log.py`) are read for
   the days they ARRIVED in the window (retries dropped), whatever their own timestamps: an
   event stamped long before the window is filed under its arrival day, so it is trained on
   by the next run instead of being lost, and a rerun of an interval reads the same events.
   Users on the erasure list (`pipeline/data/erased.py`) are dropped from everything read.
3. Map columns, normalise types (ids: strings, timestamps: UTC, rating: float, event_type:
   lower-case, "interaction" when missing) and write the window's history partitions
   `tenants/{t}/history/dt=YYYY-MM-DD/part.parquet` (replacing exactly those days; a source
   row is filed under its event day, an API event under its arrival day).
4. Write `paths.INTERACTIONS` (`runs/{run}/extract/interactions.parquet`): the history before the window plus the
   window's rows, i.e. every event before `interval_end` (rows with unparseable timestamps of
   this run's read are kept too, for validation to report), with `event_type` and its
   confidence `weight` from `source.event_types`. Sorted: the same input gives the same bytes.

Optional: the item catalog (`catalog.parquet`) and user attributes (`users.parquet`), read by
pipeline/data/attributes.py.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pandas as pd

from pipeline.context import RunContext, StageIO
from pipeline.data import attributes, event_log, history, sources
from pipeline.data import erased as erased_users
from pipeline.data.sources import is_sql_url
from pipeline.storage import codecs, paths

STAGE = "extract"
IO = StageIO(writes=(paths.INTERACTIONS, paths.CATALOG, paths.USER_ATTRIBUTES, paths.EXTRACT_RESULT))
CANONICAL = ["user_id", "item_id", "timestamp", "rating"]
COLUMNS = [*CANONICAL, "event_type", "weight"]
_READ_THREADS = 4


def _reader(ctx: RunContext) -> sources.Reader:
    return sources.Reader(ctx.settings.data_root, lambda message: ctx.error(STAGE, message))


def _map(ctx: RunContext, name: str, df: pd.DataFrame) -> pd.DataFrame:
    """Source columns -> user_id, item_id, timestamp (UTC), rating, event_type."""
    src = ctx.config.source
    cols = src.columns
    if df.empty and not len(df.columns):  # an empty JSON Lines file
        return history.empty()
    mapping = {"user_id": cols.user_id, "item_id": cols.item_id, "timestamp": cols.timestamp}
    if cols.rating:
        mapping["rating"] = cols.rating
    if cols.event_type:
        mapping["event_type"] = cols.event_type
    missing = [
        f"{src_col!r} (source.columns.{field})" for field, src_col in mapping.items() if src_col not in df.columns
    ]
    if missing:
        raise ctx.error(
            STAGE, f"file {name}: column {', '.join(missing)} not found; columns present: {list(map(str, df.columns))}"
        )
    out = pd.DataFrame({field: df[src_col] for field, src_col in mapping.items()}).reset_index(drop=True)
    if "rating" not in out:
        out["rating"] = np.nan
    if "event_type" not in out:
        out["event_type"] = pd.NA
    out["timestamp"] = _normalise_timestamps(ctx, out["timestamp"])
    return out


def _normalise_timestamps(ctx: RunContext, ts: pd.Series) -> pd.Series:
    """Epoch numbers (in source.timestamp_unit) or ISO 8601 strings -> UTC; unparseable -> NaT."""
    if pd.api.types.is_datetime64_any_dtype(ts):
        out = pd.to_datetime(ts, utc=True)
    else:
        numeric = pd.to_numeric(ts, errors="coerce")
        if ts.notna().sum() and numeric.notna().sum() == ts.notna().sum():
            out = pd.to_datetime(numeric, unit=ctx.config.source.timestamp_unit, utc=True, errors="coerce")
        else:
            out = pd.to_datetime(ts.astype("string"), utc=True, errors="coerce", format="ISO8601")
    return out.astype("datetime64[us, UTC]")


def _normalise(df: pd.DataFrame) -> pd.DataFrame:
    et = df["event_type"].astype("string").str.strip().str.lower()
    return pd.DataFrame(
        {
            "user_id": df["user_id"].astype("string").str.strip(),
            "item_id": df["item_id"].astype("string").str.strip(),
            "timestamp": df["timestamp"],
            "rating": pd.to_numeric(df["rating"], errors="coerce").astype("float64"),
            "event_type": et.mask(et.isna() | (et == ""), history.DEFAULT_EVENT_TYPE),
        }
    )


def _read_source(ctx: RunContext, window: history.Window) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The source's rows for the window (plain files: all rows), mapped; and how it was read."""
    src = ctx.config.source
    if is_sql_url(src.uri):
        params = {"start": window.start or sources.EPOCH, "end": window.interval_end}
        df = _reader(ctx).sql(src.uri, src.query or "", params, "source")
        return _map(ctx, "query result", df), {"source_kind": "sql", "files": 0}
    read = _reader(ctx)
    files, partitioned = read.list(src.uri, src.format, "source.uri", src.partition_key)
    if partitioned:
        files = [
            f
            for f in files
            if f.date is not None  # partitioned: every file has one
            and f.date <= window.last_source_day
            and (window.first_day is None or f.date >= window.first_day)
        ]

    def one(f: sources.SourceFile) -> pd.DataFrame:
        cols = src.columns
        return _map(ctx, f.name, read.table(f.name, f.read(), src.format, src.delimiter, [cols.user_id, cols.item_id]))

    if len(files) > 1:
        with ThreadPoolExecutor(max_workers=_READ_THREADS) as pool:
            frames = list(pool.map(one, files))
    else:
        frames = [one(f) for f in files]
    df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else (frames[0] if frames else history.empty())
    return df, {"source_kind": "partitioned" if partitioned else "files", "files": len(files)}


def _unknown_types(ctx: RunContext, event_type: pd.Series) -> dict[str, int]:
    weights = ctx.config.source.event_types
    if not weights:
        return {}
    known = event_type.isin([history.DEFAULT_EVENT_TYPE, *weights])
    counts = event_type[~known].value_counts().sort_index()
    return {str(k): int(v) for k, v in counts.items()}


def _check_unknown(ctx: RunContext, event_type: pd.Series) -> dict[str, int]:
    return raise_unknown(ctx, _unknown_types(ctx, event_type))


def raise_unknown(ctx: RunContext, unknown: dict[str, int]) -> dict[str, int]:
    """Fail on unknown event types when the tenant says so (source.unknown_event_types=error)."""
    if unknown and ctx.config.source.unknown_event_types == "error":
        raise ctx.error(
            STAGE,
            f"unknown event types {unknown} (rows per type; source.unknown_event_types=error): "
            f"add them to source.event_types {sorted(ctx.config.source.event_types)} or set unknown_event_types: drop",
        )
    return unknown


def _weigh(ctx: RunContext, df: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Add `weight` from source.event_types; drop unknown types (or fail), weight-0 types and
    ratings below source.rating_threshold."""
    src = ctx.config.source
    et = df["event_type"]
    unknown = _check_unknown(ctx, et)
    if src.event_types:
        weights = {history.DEFAULT_EVENT_TYPE: 1.0, **src.event_types}
        codes, names = pd.factorize(et)  # a handful of distinct types: map those, not every row
        lookup = np.array([weights.get(n, np.nan) for n in names] + [np.nan], dtype="float64")
        weight = pd.Series(lookup[codes], index=df.index)  # code -1 (missing) -> the trailing NaN
    else:
        weight = pd.Series(1.0, index=df.index)
    zero = weight == 0
    below = (
        df["rating"] < src.rating_threshold if src.rating_threshold is not None else pd.Series(False, index=df.index)
    )
    keep = weight.notna() & ~zero & ~below
    out = df.assign(weight=weight)[COLUMNS]
    if not keep.all():
        out = out.loc[keep].reset_index(drop=True)
    counts = out["event_type"].value_counts().sort_index()
    return out, {
        "event_types": {str(k): int(v) for k, v in counts.items()},
        "dropped_unknown_event_types": unknown,
        "dropped_zero_weight": int((zero & weight.notna()).sum()),
        "dropped_below_rating_threshold": int((below & weight.notna() & ~zero).sum()),
    }


def _missing_from(new: pd.DataFrame, old: pd.DataFrame) -> int:
    """Rows of `new` not in `old`, as multisets of rows (compared by a 64-bit hash of the row)."""
    if not len(new):
        return 0

    def counts(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        return np.unique(pd.util.hash_pandas_object(df[history.COLUMNS], index=False).to_numpy(), return_counts=True)

    rows, n = counts(new)
    if not len(old):
        return int(n.sum())
    seen, h = counts(old)
    pos = np.minimum(np.searchsorted(seen, rows), len(seen) - 1)
    have = np.where(seen[pos] == rows, h[pos], 0)
    return int(np.clip(n - have, 0, None).sum())


def _by_filed_day(df: pd.DataFrame, filed: pd.Series) -> tuple[pd.DataFrame, np.ndarray]:
    """History columns sorted by (filing day, every column), and those days: a source row is
    filed under its event day, an API event under the day it arrived. Without late API events
    this is the plain history order (the timestamp leads the sort)."""
    day = filed.dt.tz_convert(None).to_numpy("datetime64[us]").astype("datetime64[D]")
    out = history.canonical(df, sort=False).assign(_day=day)
    out = out.sort_values(["_day", *history.SORT], kind="stable", na_position="last").reset_index(drop=True)
    return out.drop(columns="_day"), out["_day"].to_numpy("datetime64[D]")


def _write_partitions(ctx: RunContext, win: pd.DataFrame, day: np.ndarray, end_day) -> tuple[list, int]:
    """One partition per filing day of `win` (sorted by `day`) before `end_day`."""
    cut = int(np.searchsorted(day, np.datetime64(end_day, "D")))
    if not cut:
        return [], 0
    days, starts = np.unique(day[:cut], return_index=True)
    written = []
    for d, a, b in zip(days, starts, [*starts[1:], cut], strict=True):
        when = pd.Timestamp(d).date()
        part = win.iloc[a:b].reset_index(drop=True)
        ctx.store.put(history.partition_key(ctx.tenant, when), codecs.parquet_bytes(part))
        written.append(when)
    return written, cut


def engine_of(ctx: RunContext) -> str:
    """`data.engine` (tests run the same cases on both engines by patching this)."""
    return ctx.config.data.engine


def extract(ctx: RunContext) -> dict[str, Any]:
    if engine_of(ctx) == "duckdb":
        from pipeline.data import extract_streamed

        return extract_streamed.extract(ctx)
    src = ctx.config.source
    start = history.interval_start(ctx.config.schedule, ctx.interval_end, ctx.interval_start)
    existing = history.partitions(ctx.store, ctx.tenant)
    window = history.plan(list(existing), start, ctx.interval_end, src.lookback_days)
    read, info = _read_source(ctx, window)
    logged = event_log.read(ctx.store, ctx.tenant, ctx.interval_end, start=window.start)  # by arrival
    frames = [read[history.COLUMNS]]
    if len(logged):
        frames.append(logged[history.COLUMNS])
    df = _normalise(pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0])
    from_source = pd.Series(np.arange(len(df)) < len(read), index=df.index)
    # when a row counts for the window: a source row at its event time, an API event when it arrived
    filed = df["timestamp"]
    if len(logged):
        received = logged["received_at"].astype(filed.dtype)
        filed = pd.concat([filed.iloc[: len(read)], received], ignore_index=True).set_axis(df.index)
    late_api = int((~from_source & (df["timestamp"] < pd.Timestamp(window.start or sources.EPOCH))).sum())
    del read, frames  # peak memory: the source is held once, as `df`

    erased = erased_users.hashes(ctx.store, ctx.tenant)
    gone = erased_users.erased_mask(df["user_id"], erased)
    end = pd.Timestamp(ctx.interval_end)
    # NaT rows are kept on purpose (not in the history: they have no day): validation reports them.
    nat = filed.isna()
    after = filed >= end
    before = filed < pd.Timestamp(window.start) if window.start is not None else pd.Series(False, index=df.index)
    fresh = ~nat & ~after & ~before
    _check_unknown(ctx, df.loc[(fresh | nat) & ~gone, "event_type"])  # fail before touching the history

    old_keys = [k for d, k in existing.items() if window.first_day is not None and d < window.first_day]
    old = history.read(ctx.store, old_keys)
    old_gone = erased_users.erased_mask(old["user_id"], erased)
    if old_gone.any():  # erased after these partitions were written (forget-user rewrites them too)
        old = old[~old_gone].reset_index(drop=True)
    if info["source_kind"] == "files":  # a plain file is read whole: late = old rows the history lacks
        late = _missing_from(history.canonical(df[before & from_source & ~gone], sort=False), old)
    else:  # partitions and queries return only new rows: any before the window is late
        late = int((before & from_source & ~gone).sum())

    unparseable = history.canonical(df[nat & ~gone])
    keep = fresh & ~gone
    win, day = _by_filed_day(df if keep.all() else df[keep], filed if keep.all() else filed[keep])
    dropped_erased = int(gone.sum()) + int(old_gone.sum())
    del df, from_source, filed
    written, rows_written = _write_partitions(ctx, win, day, window.end_day)
    deleted = [d for d in existing if window.rewrites(d) and d not in set(written)]
    for day_gone in deleted:
        ctx.store.delete(existing[day_gone])

    # the run's output: history before the window + the window's rows (+ unparseable timestamps)
    parts = [p for p in (old, win, unparseable) if len(p)]
    out = pd.concat(parts, ignore_index=True) if len(parts) > 1 else (parts[0] if parts else history.empty())
    del old, win, parts
    out, weights = _weigh(ctx, out)  # already in order: older days, the window, then NaT rows
    key = ctx.write(paths.INTERACTIONS, codecs.parquet_bytes(out))

    valid_ts = out["timestamp"].dropna()
    counts = {
        "rows": len(out),
        "users": int(out["user_id"].nunique()),
        "items": int(out["item_id"].nunique()),
        "min_timestamp": valid_ts.min().isoformat() if len(valid_ts) else None,
        "max_timestamp": valid_ts.max().isoformat() if len(valid_ts) else None,
    }
    run = {
        **info,
        "engine": "pandas",
        "event_log_rows": len(logged),
        "event_log_late_rows": late_api,
        "dropped_erased_users": dropped_erased,
        "dropped_after_interval_end": int(after.sum()),
        "late_dropped": late,
        "unparseable_timestamps": int(nat.sum()),
        "history_partitions_written": len(written),
        "history_partitions_deleted": len(deleted),
        "history_rows_written": rows_written,
        "history_partitions_read": len(old_keys),
    }
    return finish(ctx, key, start, window, erased, counts, run, weights)


def finish(
    ctx: RunContext,
    key: str,
    start,
    window: history.Window,
    erased: frozenset[str],
    counts: dict[str, Any],
    run: dict[str, Any],
    weights: dict[str, Any],
) -> dict[str, Any]:
    """Catalog and user attributes, the result and its log line (both engines)."""
    log = ctx.logger(STAGE)
    catalog = attributes.extract_catalog(ctx, _reader(ctx)) if ctx.config.catalog else None
    users = attributes.extract_users(ctx, _reader(ctx), erased) if ctx.config.users else None
    result = {
        "uri": ctx.store.uri(key),
        "key": key,
        **run,
        "catalog_items": None if catalog is None else len(catalog),
        "user_attributes": None if users is None else len(users),
        **counts,
        "interval_start": start.isoformat(),
        "window_start": None if window.start is None else window.start.isoformat(),
        "bootstrap": window.bootstrap,
        "caught_up": window.caught_up,
        **weights,
    }
    log.info(
        "extract (%s): %s read %s (%s: %d files) + %d API events; history: %d partitions rewritten (%d rows), "
        "%d deleted, %d older read; %d rows (%d users, %d items); dropped: %d at/after %s, %d late before the "
        "window, %d unknown-type, %d below rating threshold%s",
        run["engine"],
        "bootstrap," if window.bootstrap else "window",
        "everything" if window.start is None else f"from {window.start.date().isoformat()}",
        run["source_kind"],
        run["files"],
        run["event_log_rows"],
        run["history_partitions_written"],
        run["history_rows_written"],
        run["history_partitions_deleted"],
        run["history_partitions_read"],
        result["rows"],
        result["users"],
        result["items"],
        run["dropped_after_interval_end"],
        pd.Timestamp(ctx.interval_end).isoformat(),
        run["late_dropped"],
        sum(weights["dropped_unknown_event_types"].values()),
        weights["dropped_below_rating_threshold"],
        "" if catalog is None else f"; catalog {len(catalog)} items",
    )
    return ctx.write_result(STAGE, result)
