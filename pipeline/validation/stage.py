"""validate: the tenant's Great Expectations 1.x suite over the run's extract.

The suite is the default suite plus the tenant's additions and relaxations
(`pipeline/config/expectations.py`, `include/expectations/{tenant}.yaml`); its checks are
built in `pipeline/validation/checks.py`, run by `pipeline/validation/gx.py` and put into
words in `pipeline/validation/report.py`.
Each check is blocking (the run stops, naming every blocking failure) or a warning (reported;
the run goes on).

Reads extract's interactions (and catalog); writes (`IO`):
  VALIDATION_REPORT  every check and expectation with observed values, the interval's volume
                     (read back by later runs for the volume check), warnings, Data Docs key
  DATA_DOCS          GX Data Docs HTML (deterministic: a rerun writes the same bytes)
  EXCLUDED_USERS     the users `bot_users.filter` removes (empty when it removes none): the
                     features stage drops their events, so the table is never copied.

The interval is [interval_start, interval_end), as extract defines it: Airflow's data
interval, or, without one (CLI), the tenant schedule's previous tick. Never the wall clock.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from pipeline.config.expectations import SuiteConfig, load_suite_config
from pipeline.context import RunContext, StageIO
from pipeline.data import attributes, history
from pipeline.storage import codecs, paths
from pipeline.validation import checks, gx
from pipeline.validation import report as reporting

STAGE = "validate"
IO = StageIO(
    reads=(paths.INTERACTIONS, paths.CATALOG, paths.EXTRACT_RESULT),
    writes=(paths.VALIDATION_REPORT, paths.DATA_DOCS, paths.EXCLUDED_USERS),
)
KEY_COLUMNS = checks.KEY_COLUMNS
EXCLUDED_COLUMNS = ["user_id"]


class ValidationFailed(RuntimeError):
    """Blocking expectations failed; the message lists each one."""


def interval_of(ctx: RunContext) -> tuple[pd.Timestamp, pd.Timestamp]:
    """The run's data interval [start, end) in UTC, as extract defines it (`history.interval_start`):
    Airflow's data interval, else the schedule's previous tick, else one day."""
    start = history.interval_start(ctx.config.schedule, ctx.interval_end, ctx.interval_start)
    return checks.utc(start), checks.utc(ctx.interval_end)


def previous_volumes(ctx: RunContext, start: pd.Timestamp, end: pd.Timestamp, window: int) -> list[dict[str, Any]]:
    """Interval volumes of the previous runs (interval end before this one's, within `window`
    periods), oldest first, at most `window`. Reruns and backfills see the same history."""
    earliest = end - window * (end - start)
    found: list[dict[str, Any]] = []
    for run_id in paths.run_ids(ctx.store.list(paths.runs_prefix(ctx.tenant)), ctx.tenant):
        try:
            run_end = pd.Timestamp(paths.interval_end_of(run_id))
        except ValueError:
            continue
        key = paths.VALIDATION_REPORT.key(ctx.tenant, run_id)
        if earliest <= run_end < end and ctx.store.exists(key):
            interval = codecs.read_json(ctx.store.get(key)).get("interval") or {}
            if interval.get("events") is not None:
                found.append({"run_id": run_id, "events": int(interval["events"])})
    return sorted(found, key=lambda h: h["run_id"])[-window:]


def _user_hour_events(df: pd.DataFrame, in_interval: pd.Series) -> pd.Series:
    """For each interval event, its user's events in the same clock hour (NaN outside the interval)."""
    sub = df.loc[in_interval, ["user_id", "timestamp"]]
    counts = sub.groupby([sub["user_id"], sub["timestamp"].dt.floor("h")])["user_id"].transform("size")
    return counts.reindex(df.index).astype("float64")


def _derive(df: pd.DataFrame, user_hour: pd.Series, catalog: pd.DataFrame | None) -> pd.DataFrame:
    """The batch GX sees: the extract plus the derived columns the rate checks need."""
    out = df.assign(**{checks.USER_HOUR: user_hour})
    if catalog is not None:
        out[checks.IN_CATALOG] = df["item_id"].isin(catalog["item_id"]).astype(bool)
    return out


def _stats(df, in_interval, user_hour, spec: SuiteConfig, frame: checks.Frame, catalog) -> dict[str, Any]:
    """Context for the messages (pandas, vectorised): what a data engineer needs to act."""
    ts = df["timestamp"]
    inside = df.loc[in_interval]
    stats: dict[str, Any] = {
        "start": frame.start,
        "end": frame.end,
        "max_timestamp": checks._fmt_ts(ts.max()) if ts.notna().any() else None,
        "interval_events": len(inside),
        "peak_user_hour": int(user_hour.max()) if user_hour.notna().any() else 0,
    }
    if "event_type" in df:
        bad = df.loc[~df["event_type"].isin(frame.event_types) & df["event_type"].notna(), "event_type"]
        stats["bad_event_types"] = bad.value_counts().head(5).to_dict()
    over = df.loc[user_hour > spec.bot_users.max_events_per_hour, ["user_id", "timestamp"]]
    peaks = (
        over.assign(hour=over["timestamp"].dt.floor("h"), events=user_hour[over.index].astype(int))
        .sort_values(["events", "user_id"], ascending=[False, True], kind="stable")
        .drop_duplicates("user_id")
    )
    stats["bots"] = [
        {"user_id": str(u), "events": int(n), "hour": checks._fmt_ts(h)}
        for u, n, h in zip(peaks["user_id"], peaks["events"], peaks["hour"], strict=True)
    ]
    if catalog is not None:
        unknown = inside.loc[~inside["item_id"].isin(catalog["item_id"]), "item_id"]
        stats["unknown_items"] = list(unknown.value_counts().head(5).index.astype(str))
    median, floor, _ = checks.volume_floor(frame.history, spec.volume)
    if median is not None and floor is not None:
        stats["volume"] = {
            "median": median,
            "runs": len(frame.history),
            "change": len(inside) / median - 1,
            "max_drop": spec.volume.max_drop,
        }
    return stats


def _bots(spec: SuiteConfig, stats: dict[str, Any]) -> list[str]:
    return [b["user_id"] for b in stats["bots"]] if spec.bot_users.enabled and spec.bot_users.filter else []


def _exclude_bots(ctx: RunContext, users: list[str], stats: dict[str, Any], filtered_rows: int) -> list[str]:
    """Record the users training must not see (flagged bots when the tenant filters them).

    Always written, empty or not, so a rerun never leaves an earlier run's list behind."""
    if users:
        stats["filtered_rows"] = filtered_rows
    ctx.write(paths.EXCLUDED_USERS, codecs.parquet_bytes(pd.DataFrame({"user_id": pd.array(users, dtype="string")})))
    return users


def _external(spec: SuiteConfig, rows: int, extracted: dict[str, Any], end: pd.Timestamp) -> list[dict]:
    """The checks GX cannot see: the whole table's size (GX sees the rows read this run), and
    events extract dropped for being stamped at/after the interval end when those can only come
    from this interval's own data: a date-partitioned source read for days before the end's day
    (an interval ending at midnight). Other sources are read whole (a backfill legitimately sees
    later events) or bound to the interval by their query."""
    out = []
    if (c := spec.row_count).enabled:
        out.append(
            reporting.external(
                "row_count",
                c.severity,
                "expect_table_row_count_to_be_between",
                f"at least {c.min:,} rows in the table extract hands over",
                rows >= c.min,
                observed_value=rows,
                kwargs={"min_value": c.min},
            )
        )
    ft = spec.future_timestamps
    if ft.enabled and extracted.get("source_kind") == "partitioned" and end == end.normalize():
        n = int(extracted.get("dropped_after_interval_end") or 0)
        out.append(
            reporting.external(
                "future_timestamps",
                ft.severity,
                checks.EXTRACT_DROPPED_FUTURE,
                "no events in this interval's source partitions stamped at or after the interval end",
                n == 0,
                unexpected_count=n,
            )
        )
    return out


def validate(ctx: RunContext) -> dict[str, Any]:
    log = ctx.logger(STAGE)
    assert ctx.settings.expectations_dir is not None  # Settings fills the default at construction
    spec, files, origins = load_suite_config(ctx.config, ctx.settings.expectations_dir)
    extracted = ctx.read_json(paths.EXTRACT_RESULT) if ctx.exists(paths.EXTRACT_RESULT) else {}
    catalog = attributes.load_catalog(ctx)
    start, end = interval_of(ctx)
    history_ = previous_volumes(ctx, start, end, spec.volume.window)
    read_since = extracted.get("window_start")
    frame = checks.Frame(
        columns=[],
        start=start,
        end=end,
        read_since=checks.utc(read_since) if read_since else None,
        has_rating=ctx.config.source.columns.rating is not None,
        has_catalog=catalog is not None,
        event_types=spec.event_types.allowed_for(ctx.config),
        history=history_,
    )
    run = _streamed if ctx.config.data.engine == "duckdb" else _in_memory
    res, docs_key, stats, counts, excluded, skipped, described = run(ctx, spec, origins, frame, catalog, extracted)
    described.sort(key=lambda e: (e["check"] or "", e["expectation"], str(e["column"])))
    outcomes = reporting.summarise(described, spec, skipped, stats)
    failures = [o for o in outcomes if o.status == "fail"]
    warnings = [o for o in outcomes if o.status == "warn"]
    docs_uri = ctx.store.uri(docs_key) if docs_key else None
    report: dict[str, Any] = {
        "tenant": ctx.tenant,
        "run_id": ctx.run_id,
        "success": not failures,
        "rows": counts["rows"],
        "duplicate_rows": counts["duplicate_rows"],  # repeats in the interval
        "interval": {"start": start.isoformat(), "end": end.isoformat(), "events": stats["interval_events"]},
        "rows_checked": counts["rows_checked"],
        "rows_checked_since": frame.read_since.isoformat() if frame.read_since is not None else None,
        "volume_history": history_,
        "checks": [o.__dict__ for o in outcomes],
        "failures": [f"{o.check}: {o.message}" for o in failures],
        "warnings": [f"{o.check}: {o.message}" for o in warnings],
        "statistics": counts["statistics"],
        "expectations": described,
        "expectations_files": files,
        "filtered_users": excluded,
        "data_docs": docs_uri,
        "data_docs_key": docs_key,
    }
    report_key = ctx.write(paths.VALIDATION_REPORT, codecs.json_bytes(report))
    log.info(
        "validation of %s (%s): %d rows, %d in the interval [%s, %s)\n%s",
        paths.INTERACTIONS,
        ctx.config.data.engine,
        counts["rows"],
        report["interval"]["events"],
        checks._fmt_ts(start),
        checks._fmt_ts(end),
        reporting.table(outcomes),
    )
    for o in warnings:
        log.warning("WARNING %s: %s", o.check, o.message)
    for o in failures:
        log.error("BLOCKING %s: %s", o.check, o.message)
    log.info("validation report: %s; Data Docs (HTML): %s", ctx.store.uri(report_key), docs_uri)
    result = {
        "success": report["success"],
        "evaluated": len(described),
        "failed": sum(1 for e in described if not e["success"] and e["severity"] == "blocking"),
        "warnings": len(warnings),
        "duplicate_rows": report["duplicate_rows"],
        "interval_events": report["interval"]["events"],
        "filtered_rows": stats.get("filtered_rows", 0),
        "table_uri": ctx.uri(paths.INTERACTIONS),
        "excluded_users": len(excluded),
        "excluded_users_uri": ctx.uri(paths.EXCLUDED_USERS),
        "report_uri": ctx.store.uri(report_key),
        "data_docs_uri": docs_uri,
    }
    ctx.write_result(STAGE, result)
    if failures:
        lines = "\n  - ".join(f"{o.check} [blocking] {o.message}" for o in failures)
        also = "".join(f"\n  (warning) {o.check}: {o.message}" for o in warnings)
        raise ValidationFailed(
            f"[tenant {ctx.tenant}, run {ctx.run_id}] validation failed: {len(failures)} blocking check(s) of "
            f"{len(outcomes)} on {paths.INTERACTIONS}:\n  - {lines}{also}\n"
            f"report: {ctx.store.uri(report_key)}\nData Docs: {docs_uri}"
        )
    return result


def _in_memory(ctx: RunContext, spec: SuiteConfig, origins, frame: checks.Frame, catalog, extracted) -> tuple:
    """pandas + GX on the whole batch."""
    df = ctx.read_parquet(paths.INTERACTIONS)
    frame.columns = list(df.columns)
    in_interval = (df["timestamp"] >= frame.start) & (df["timestamp"] < frame.end)  # NaT: False
    expectations, skipped = checks.build(spec, frame, origins)
    user_hour = _user_hour_events(df, in_interval)
    stats = _stats(df, in_interval, user_hour, spec, frame, catalog)
    stats["extract_dropped_event_types"] = extracted.get("dropped_unknown_event_types") or {}
    bots = _bots(spec, stats)
    excluded = _exclude_bots(ctx, bots, stats, int(df["user_id"].isin(bots).sum()) if bots else 0)
    # GX sees the rows this run read (see validation_checks); every row on a first run
    if frame.read_since is None:
        read = pd.Series(True, index=df.index)
    else:
        read = in_interval | df["timestamp"].isna() | (df["timestamp"] >= frame.read_since)
    res, docs_key = gx.run_suite(ctx, _derive(df.loc[read], user_hour.loc[read], catalog), expectations)
    described = [reporting.describe(r) for r in res.results] + _external(spec, len(df), extracted, frame.end)
    dup_key = [c for c in (*KEY_COLUMNS, "event_type") if c in df]
    counts = {
        "rows": len(df),
        "duplicate_rows": int(df.loc[in_interval].duplicated(dup_key).sum()),
        "rows_checked": int(read.sum()),
        "statistics": dict(res.statistics),
    }
    return res, docs_key, stats, counts, excluded, skipped, described


def _streamed(ctx: RunContext, spec: SuiteConfig, origins, frame: checks.Frame, catalog, extracted) -> tuple:
    """DuckDB's exact counts over every row, GX on a sample (pipeline/validation/streamed.py)."""
    from pipeline.data import engine
    from pipeline.validation import streamed

    with engine.session(ctx) as s:
        frame.columns = streamed.prepare(ctx, s, frame.start, frame.end, frame.read_since, catalog)
        expectations, skipped = checks.build(spec, frame, origins)
        exact = {streamed.key_of(e.configuration): streamed.exact(s, e, frame.columns) for e in expectations}
        stats = streamed.stats(s, spec, frame, catalog is not None)
        stats["extract_dropped_event_types"] = extracted.get("dropped_unknown_event_types") or {}
        bots = _bots(spec, stats)
        dup_key = [c for c in (*KEY_COLUMNS, "event_type") if c in frame.columns]
        counts = streamed.totals(s, dup_key, bots)
        batch = streamed.sample(s)
    excluded = _exclude_bots(ctx, bots, stats, counts["filtered_rows"])
    res, docs_key = gx.run_suite(ctx, batch, expectations)
    described = [reporting.describe(r) for r in res.results]
    streamed.merge(res.results, described, exact)
    ok = sum(1 for e in described if e["success"])
    counts["statistics"] = {
        "evaluated_expectations": len(described),
        "successful_expectations": ok,
        "unsuccessful_expectations": len(described) - ok,
        "success_percent": 100.0 * ok / len(described) if described else None,
    }
    described += _external(spec, counts["rows"], extracted, frame.end)
    return res, docs_key, stats, counts, excluded, skipped, described
