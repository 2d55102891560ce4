"""The tenant's source loaded into a DuckDB session (table `src`), as extract's pandas path reads it.

For `pipeline/data/extract_streamed.py`. The rules of extract._map/_normalise, in SQL:
* CSV is read with every column as text and pandas' NA strings as NULL (`pd.read_csv`'s
  defaults); a file's timestamps are epochs (in `source.timestamp_unit`, split into whole and
  fractional part as pandas does) when every non-null value is a number, else ISO 8601
  (`TRY_CAST ... AS TIMESTAMPTZ`, the session is UTC); unparseable or out of pandas' range ->
  NULL. Parquet keeps its types (timestamps and dates -> UTC, numbers -> epochs, text as CSV).
* ids and event types are stripped of Python's whitespace (`str.strip`), event types
  lower-cased, missing or empty -> "interaction"; ratings that are not numbers (or NaN) -> NULL.
* JSON Lines files and SQL results are read by the pandas readers (one file, or one query's
  result, at a time) and appended: their semantics (type guessing) are pandas'.
Errors name the tenant, the file and DuckDB's reason (without the offending line's data).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.context import RunContext
from pipeline.data import extract as in_memory
from pipeline.data import history, sources
from pipeline.data.engine import Session
from pipeline.data.sources import is_sql_url

STAGE = in_memory.STAGE
_NA = sorted(
    {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A", "NA"}
    | {"NULL", "NaN", "None", "n/a", "nan", "null"}
)  # pandas' default NA strings (pandas._libs.parsers.STR_NA_VALUES)
_WHITESPACE = "".join(c for c in map(chr, range(sys.maxunicode + 1)) if c.isspace())
_UNIT = {"s": (1_000_000_000, 9), "ms": (1_000_000, 6), "us": (1_000, 3), "ns": (1, 0)}  # ns per unit, digits
_NS_MAX = 9_223_372_036_854_775_807  # pandas' datetime64[ns] range: beyond it to_datetime gives NaT
RAW = "user_id VARCHAR, item_id VARCHAR, timestamp TIMESTAMPTZ, rating DOUBLE, event_type VARCHAR"


def q(name: str) -> str:
    """A quoted SQL identifier."""
    return '"' + str(name).replace('"', '""') + '"'


def lit(value: str) -> str:
    """A SQL string literal."""
    return "'" + value.replace("'", "''") + "'"


def _strip(expr: str) -> str:
    return f"trim(CAST({expr} AS VARCHAR), {lit(_WHITESPACE)})"


def _epoch(value: str, unit: str) -> str:
    """A number of `unit`s since the epoch -> TIMESTAMPTZ as pandas converts it (whole part
    times the unit plus the fraction rounded to the unit's digits, in ns; truncated to us)."""
    ns, digits = _UNIT[unit]
    v = f"({value})::DOUBLE"
    whole = f"trunc({v})::HUGEINT"
    total = f"({whole} * {ns} + trunc(round({v} - trunc({v}), {digits}) * {ns})::HUGEINT)"
    ok = f"(isfinite({v}) AND abs({v}) * {ns} < {_NS_MAX}.0)"
    return f"CASE WHEN {ok} THEN make_timestamptz(({total} // 1000)::BIGINT) END"


def _epoch_int(value: str, unit: str) -> str:
    ns, _ = _UNIT[unit]
    total = f"(({value})::HUGEINT * {ns})"
    return f"CASE WHEN abs({total}) < {_NS_MAX} THEN make_timestamptz(({total} // 1000)::BIGINT) END"


def _timestamp(s: Session, rel: str, col: str, kind: str, unit: str) -> str:
    """The SQL turning one file's timestamp column into TIMESTAMPTZ (in_memory._normalise_timestamps)."""
    c = q(col)
    if kind.startswith(("TIMESTAMP", "DATE")):
        return f"CAST({c} AS TIMESTAMPTZ)"
    if kind in {"TINYINT", "SMALLINT", "INTEGER", "BIGINT", "UTINYINT", "USMALLINT", "UINTEGER", "UBIGINT", "HUGEINT"}:
        return _epoch_int(c, unit)
    if kind in {"FLOAT", "DOUBLE"} or kind.startswith("DECIMAL"):
        return f"CASE WHEN {c} = trunc({c}) THEN {_epoch_int(f'{c}::DOUBLE::HUGEINT', unit)} ELSE {_epoch(c, unit)} END"
    text = f"CAST({c} AS VARCHAR)"
    nonnull, numeric = s.one(f"SELECT count({c}), count(TRY_CAST({text} AS DOUBLE)) FROM {rel}")
    if nonnull and nonnull == numeric:  # every value a number: epochs, whole numbers exactly
        big = f"TRY_CAST({text} AS DOUBLE)"
        exact = f"TRY_CAST(trim({text}) AS BIGINT)"
        whole = f"CASE WHEN {big} = trunc({big}) AND regexp_full_match(trim({text}), '[+-]?[0-9]+') THEN {exact} END"
        return f"coalesce({_epoch_int(whole, unit)}, CASE WHEN {whole} IS NULL THEN {_epoch(big, unit)} END)"
    return f"TRY_CAST({text} AS TIMESTAMPTZ)"


def _insert(s: Session, rel: str, mapping: dict[str, str], types: dict[str, str], unit: str) -> None:
    ts = _timestamp(s, rel, mapping["timestamp"], types[mapping["timestamp"]], unit)
    if "rating" in mapping:
        r = q(mapping["rating"])
        numeric = types[mapping["rating"]] in {"FLOAT", "DOUBLE"} or types[mapping["rating"]].endswith("INT")
        rating = f"TRY_CAST({r} AS DOUBLE)" if numeric else f"TRY_CAST(CAST({r} AS VARCHAR) AS DOUBLE)"
        rating = f"CASE WHEN NOT isnan({rating}) THEN {rating} END"  # NaN is pandas' NA
    else:
        rating = "NULL::DOUBLE"
    et = f"lower({_strip(q(mapping['event_type']))})" if "event_type" in mapping else "NULL"
    s.sql(
        f"INSERT INTO src SELECT {_strip(q(mapping['user_id']))}, {_strip(q(mapping['item_id']))}, {ts}, "
        f"{rating}, CASE WHEN {et} IS NULL OR {et} = '' THEN '{history.DEFAULT_EVENT_TYPE}' ELSE {et} END FROM {rel}"
    )


def _mapping(ctx: RunContext, name: str, present: list[str]) -> dict[str, str]:
    """source.columns for this file, or extract's error naming the missing ones."""
    cols = ctx.config.source.columns
    mapping = {"user_id": cols.user_id, "item_id": cols.item_id, "timestamp": cols.timestamp}
    if cols.rating:
        mapping["rating"] = cols.rating
    if cols.event_type:
        mapping["event_type"] = cols.event_type
    missing = [f"{c!r} (source.columns.{field})" for field, c in mapping.items() if c not in present]
    if missing:
        raise ctx.error(STAGE, f"file {name}: column {', '.join(missing)} not found; columns present: {present}")
    return mapping


def _append_frame(s: Session, df: pd.DataFrame) -> None:
    """Rows mapped and normalised by the pandas path (in_memory._map/_normalise) into `src`."""
    s.con.register("frame", in_memory._normalise(df)[history.COLUMNS])
    s.sql("INSERT INTO src SELECT user_id, item_id, timestamp, rating, event_type FROM frame")
    s.con.unregister("frame")


def _read_file(ctx: RunContext, s: Session, f: sources.SourceFile, n: int) -> None:
    src = ctx.config.source
    fmt = src.format if src.format != "auto" else sources.SUFFIXES.get(sources._suffixes(f.name)[0], "csv")
    if fmt == "jsonl":
        read = in_memory._reader(ctx)
        cols = [src.columns.user_id, src.columns.item_id]
        _append_frame(s, in_memory._map(ctx, f.name, read.table(f.name, f.read(), fmt, src.delimiter, cols)))
        return
    local = Path(f.name)
    if f.name.startswith("s3://") or sources._suffixes(f.name)[1] or not local.is_file():
        path = s.path(f"source_{n}.{fmt}")  # fetched (and gunzipped) once, to disk
        Path(path).write_bytes(f.read())
    else:
        path = local.as_posix()
    if fmt == "csv":
        na = "[" + ", ".join(lit(x) for x in _NA) + "]"
        reader = (
            f"read_csv({lit(path)}, delim = {lit(src.delimiter)}, header = true, quote = '\"', escape = '\"', "
            f"all_varchar = true, nullstr = {na}, encoding = 'utf-8')"
        )
    else:
        reader = f"read_parquet({lit(path)})"
    try:
        desc = s.con.sql(f"DESCRIBE SELECT * FROM {reader}").fetchall()
        s.sql(f"CREATE OR REPLACE VIEW file AS SELECT * FROM {reader}")
        types = {str(r[0]): str(r[1]) for r in desc}
        mapping = _mapping(ctx, f.name, list(types))
        _insert(s, "file", mapping, types, src.timestamp_unit)
    except Exception as exc:
        if type(exc).__name__ == "StageError":
            raise
        reason = _reason(exc)
        if "unicode" in reason.lower() or "utf-8" in reason.lower():
            raise ctx.error(STAGE, f"file {f.name}: not valid UTF-8 ({reason})") from None
        raise ctx.error(STAGE, f"file {f.name}: unreadable as {fmt}: {reason}") from None
    finally:
        s.sql("DROP VIEW IF EXISTS file")


def _reason(exc: Exception) -> str:
    """DuckDB's message up to its hints, without the offending line's data."""
    lines = []
    for line in str(exc).strip().splitlines():
        if not line.strip():
            break
        if not line.startswith("Original Line:"):
            lines.append(line.strip())
    return "; ".join(lines)


def read_source(ctx: RunContext, s: Session, window: history.Window) -> dict[str, Any]:
    """Table `src`: the source's rows for the window (plain files: all rows), normalised."""
    src = ctx.config.source
    s.sql(f"CREATE TABLE src ({RAW})")
    if is_sql_url(src.uri):
        params = {"start": window.start or sources.EPOCH, "end": window.interval_end}
        df = in_memory._reader(ctx).sql(src.uri, src.query or "", params, "source")
        _append_frame(s, in_memory._map(ctx, "query result", df))
        return {"source_kind": "sql", "files": 0}
    files, partitioned = in_memory._reader(ctx).list(src.uri, src.format, "source.uri", src.partition_key)
    if partitioned:
        files = [
            f
            for f in files
            if f.date is not None
            and f.date <= window.last_source_day
            and (window.first_day is None or f.date >= window.first_day)
        ]
    for n, f in enumerate(files):
        _read_file(ctx, s, f, n)
    return {"source_kind": "partitioned" if partitioned else "files", "files": len(files)}
