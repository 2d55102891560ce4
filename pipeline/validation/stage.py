"""validate: the tenant's Great Expectations 1.x suite over the run's extract.

The suite is the default suite plus the tenant's additions and relaxations
(`pipeline/config/expectations.py`, `include/expectations/{tenant}.yaml`); its checks are
built in `pipeline/validation_checks.py` and put into words in `pipeline/validation_report.py`.
Each check is blocking (the run stops, naming every blocking failure) or a warning (reported;
the run goes on).

Writes, under `runs/{run}/validate/`:
  report.json       every check and expectation with observed values, the interval's volume
                    (read back by later runs for the volume check), warnings, Data Docs key
  data_docs/        GX Data Docs HTML (deterministic: a rerun writes the same bytes)
  interactions.parquet  only when `bot_users.filter` removed users: the extract without their
                    events. Downstream stages read `validate.load(ctx)`, which falls back to
                    the extract when there is no filtered table.

The interval is [interval_start, interval_end), as extract defines it: Airflow's data
interval, or, without one (CLI), the tenant schedule's previous tick. Never the wall clock.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.config.expectations import SuiteConfig, load_suite_config
from pipeline.context import RunContext
from pipeline.data import attributes, extract, history
from pipeline.storage import codecs
from pipeline.validation import checks
from pipeline.validation import report as reporting

STAGE = "validate"
REPORT = "report.json"
OUTPUT = "interactions.parquet"
KEY_COLUMNS = checks.KEY_COLUMNS


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
    prefix = f"tenants/{ctx.tenant}/runs/"
    earliest = end - window * (end - start)
    found = []
    for key in ctx.store.list(prefix):
        if not key.endswith(f"/{STAGE}/{REPORT}"):
            continue
        run_id = key[len(prefix) :].split("/", 1)[0]
        try:
            run_end = pd.Timestamp(datetime.strptime(run_id, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC))
        except ValueError:
            continue
        if earliest <= run_end < end:
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
    if floor is not None:
        stats["volume"] = {
            "median": median,
            "runs": len(frame.history),
            "change": len(inside) / median - 1,
            "max_drop": spec.volume.max_drop,
        }
    return stats


_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_STAMP = re.compile(r"\d{8}T\d{6}\.\d{6}Z")


def _deterministic(page: bytes, run_time: str) -> bytes:
    """GX stamps pages with the wall clock and random element ids; pin both so a rerun of
    the interval writes byte-identical reports."""
    ids: dict[str, str] = {}
    text = _UUID.sub(
        lambda m: ids.setdefault(m.group(0), f"00000000-0000-0000-0000-{len(ids):012d}"), page.decode("utf-8")
    )
    return _STAMP.sub(run_time, text).encode("utf-8")


def _publish_docs(ctx: RunContext, docs_dir: Path) -> str | None:
    """Upload the Data Docs pages (not the fonts/images they can live without).

    Returns the key of the validation page."""
    index = None
    run_time = ctx.interval_end.strftime("%Y%m%dT%H%M%S.%fZ")
    for path in sorted(docs_dir.rglob("*")):
        rel = path.relative_to(docs_dir).as_posix()
        if not path.is_file() or rel.startswith(("static/fonts/", "static/images/")):
            continue
        key = ctx.key(STAGE, f"data_docs/{rel}")
        data = path.read_bytes()
        ctx.store.put(key, _deterministic(data, run_time) if path.suffix in (".html", ".json") else data)
        if rel.startswith("validations/") and rel.endswith(".html"):
            index = key
    return index


def _run_gx(ctx: RunContext, batch: pd.DataFrame, expectations: list[Any]) -> tuple[Any, str | None]:
    """Run the suite on `batch`; build and upload Data Docs. Returns (GX result, docs key)."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.base import ProgressBarsConfig

    logging.getLogger("great_expectations").setLevel(logging.WARNING)  # it logs hundreds of INFO lines
    gctx = gx.get_context(mode="ephemeral")
    gctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch_def = (
        gctx.data_sources.add_pandas("tenant")
        .add_dataframe_asset("interactions")
        .add_batch_definition_whole_dataframe("extract")
    )
    suite = gctx.suites.add(gx.ExpectationSuite(name=f"recsys_{ctx.tenant}_interactions", expectations=expectations))
    vd = gctx.validation_definitions.add(
        gx.ValidationDefinition(name=f"{ctx.tenant}_interactions", data=batch_def, suite=suite)
    )
    index_cols = [c for c in KEY_COLUMNS if c in batch.columns]
    # run_time = interval end (not now) keeps report paths identical on reruns
    res = vd.run(
        batch_parameters={"dataframe": batch},
        run_id=RunIdentifier(run_name=ctx.run_id, run_time=ctx.interval_end),
        result_format={"result_format": "SUMMARY", "unexpected_index_column_names": index_cols},
    )
    with tempfile.TemporaryDirectory(prefix="recsys-gx-") as tmp:
        gctx.add_data_docs_site(
            "run",
            {
                "class_name": "SiteBuilder",
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": tmp},
            },
        )
        gctx.build_data_docs(site_names=["run"])
        docs_key = _publish_docs(ctx, Path(tmp))
        shutil.rmtree(tmp, ignore_errors=True)
    return res, docs_key


def _filter_bots(ctx: RunContext, df: pd.DataFrame, spec: SuiteConfig, stats: dict[str, Any]) -> str | None:
    """Write the extract without flagged users' events when the tenant filters bots; else make
    sure no stale filtered table is left from an earlier run of this interval."""
    key = ctx.key(STAGE, OUTPUT)
    users = [b["user_id"] for b in stats["bots"]]
    if spec.bot_users.enabled and spec.bot_users.filter and users:
        keep = ~df["user_id"].isin(users)
        stats["filtered_rows"] = int((~keep).sum())
        ctx.store.put(key, codecs.parquet_bytes(df.loc[keep].reset_index(drop=True)))
        return key
    if ctx.store.exists(key):
        ctx.store.delete(key)
    return None


def load(ctx: RunContext) -> pd.DataFrame:
    """The interactions downstream stages should use: validate's filtered table when bot
    filtering removed users, else the extract."""
    key = ctx.key(STAGE, OUTPUT)
    return codecs.read_parquet(ctx.store.get(key)) if ctx.store.exists(key) else extract.load(ctx)


def _external(spec: SuiteConfig, df: pd.DataFrame, extracted: dict[str, Any], end: pd.Timestamp) -> list[dict]:
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
                len(df) >= c.min,
                observed_value=len(df),
                kwargs={"min_value": c.min},
            )
        )
    c = spec.future_timestamps
    if c.enabled and extracted.get("source_kind") == "partitioned" and end == end.normalize():
        n = int(extracted.get("dropped_after_interval_end") or 0)
        out.append(
            reporting.external(
                "future_timestamps",
                c.severity,
                checks.EXTRACT_DROPPED_FUTURE,
                "no events in this interval's source partitions stamped at or after the interval end",
                n == 0,
                unexpected_count=n,
            )
        )
    return out


def validate(ctx: RunContext) -> dict[str, Any]:
    log = ctx.logger(STAGE)
    spec, files, origins = load_suite_config(ctx.config, ctx.settings.expectations_dir)
    df = extract.load(ctx)
    extracted = ctx.read_result("extract") or {}
    catalog = attributes.load_catalog(ctx)
    start, end = interval_of(ctx)
    in_interval = (df["timestamp"] >= start) & (df["timestamp"] < end)  # NaT: False
    history_ = previous_volumes(ctx, start, end, spec.volume.window)
    read_since = extracted.get("window_start")
    frame = checks.Frame(
        columns=list(df.columns),
        start=start,
        end=end,
        read_since=checks.utc(read_since) if read_since else None,
        has_rating=ctx.config.source.columns.rating is not None,
        has_catalog=catalog is not None,
        event_types=spec.event_types.allowed_for(ctx.config),
        history=history_,
    )
    expectations, skipped = checks.build(spec, frame, origins)
    user_hour = _user_hour_events(df, in_interval)
    stats = _stats(df, in_interval, user_hour, spec, frame, catalog)
    stats["extract_dropped_event_types"] = extracted.get("dropped_unknown_event_types") or {}
    filtered_key = _filter_bots(ctx, df, spec, stats)
    # GX sees the rows this run read (see validation_checks); every row on a first run
    if frame.read_since is None:
        read = pd.Series(True, index=df.index)
    else:
        read = in_interval | df["timestamp"].isna() | (df["timestamp"] >= frame.read_since)
    res, docs_key = _run_gx(ctx, _derive(df.loc[read], user_hour.loc[read], catalog), expectations)
    described = [reporting.describe(r) for r in res.results] + _external(spec, df, extracted, end)
    described.sort(key=lambda e: (e["check"] or "", e["expectation"], str(e["column"])))
    outcomes = reporting.summarise(described, spec, skipped, stats)
    failures = [o for o in outcomes if o.status == "fail"]
    warnings = [o for o in outcomes if o.status == "warn"]
    docs_uri = ctx.store.uri(docs_key) if docs_key else None
    report_key = ctx.key(STAGE, REPORT)
    dup_key = [c for c in (*KEY_COLUMNS, "event_type") if c in df]
    report = {
        "tenant": ctx.tenant,
        "run_id": ctx.run_id,
        "success": not failures,
        "rows": len(df),
        "duplicate_rows": int(df.loc[in_interval].duplicated(dup_key).sum()),  # repeats in the interval
        "interval": {"start": start.isoformat(), "end": end.isoformat(), "events": int(in_interval.sum())},
        "rows_checked": int(read.sum()),
        "rows_checked_since": frame.read_since.isoformat() if frame.read_since is not None else None,
        "volume_history": history_,
        "checks": [o.__dict__ for o in outcomes],
        "failures": [f"{o.check}: {o.message}" for o in failures],
        "warnings": [f"{o.check}: {o.message}" for o in warnings],
        "statistics": dict(res.statistics),
        "expectations": described,
        "expectations_files": files,
        "filtered_table": ctx.store.uri(filtered_key) if filtered_key else None,
        "filtered_users": [b["user_id"] for b in stats["bots"]] if filtered_key else [],
        "data_docs": docs_uri,
        "data_docs_key": docs_key,
    }
    ctx.store.put(report_key, codecs.json_bytes(report))
    log.info(
        "validation of %s: %d rows, %d in the interval [%s, %s)\n%s",
        extract.OUTPUT,
        len(df),
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
        "table_uri": ctx.store.uri(filtered_key or ctx.key("extract", extract.OUTPUT)),
        "report_uri": ctx.store.uri(report_key),
        "data_docs_uri": docs_uri,
    }
    ctx.write_result(STAGE, result)
    if failures:
        lines = "\n  - ".join(f"{o.check} [blocking] {o.message}" for o in failures)
        also = "".join(f"\n  (warning) {o.check}: {o.message}" for o in warnings)
        raise ValidationFailed(
            f"[tenant {ctx.tenant}, run {ctx.run_id}] validation failed: {len(failures)} blocking check(s) of "
            f"{len(outcomes)} on {extract.OUTPUT}:\n  - {lines}{also}\n"
            f"report: {ctx.store.uri(report_key)}\nData Docs: {docs_uri}"
        )
    return result
