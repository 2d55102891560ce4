"""extract out of core (`data.engine: duckdb`): the in-memory extract's rules, streamed by DuckDB.

pipeline/data/extract.py holds the whole source, the history and the output in pandas at once
(~3.8 GB at 10M events). Here the source's rows go into a disk-backed DuckDB session
(pipeline/data/engine.py: `data.memory_limit_gb`, spilling past it) and every step over all
rows (erasure, the window's cut, late rows, the sorts, the weights) is SQL. The history
partitions and `interactions.parquet` are streamed out in Arrow batches through pyarrow's
writer with the pandas path's schema (its pandas metadata included) and row groups, so both
engines write the same layout and the same rows in the same order
(`tests/unit/test_extract_streamed.py`), and the next stages read either alike.

How the in-memory rules map here:
* CSV is read with every column as text and pandas' NA strings as NULL (`pd.read_csv`'s
  defaults), then converted as `_map`/`_normalise` do: a file's timestamps are epochs (in
  `source.timestamp_unit`, split into whole and fractional part as pandas does) when every
  non-null value is a number, else ISO 8601 (`TRY_CAST ... AS TIMESTAMPTZ`, the session is
  UTC); unparseable or out of pandas' range -> NULL. Parquet keeps its types (timestamps and
  dates -> UTC, numbers -> epochs, text as CSV).
* ids and event types are stripped of Python's whitespace (`str.strip`), event types
  lower-cased, missing or empty -> "interaction"; ratings that are not numbers -> NULL.
* JSON Lines files and SQL results are read by the pandas readers (one file, or one query's
  result, at a time) and appended: their semantics (type guessing) are pandas'.
* Strings sort bytewise in DuckDB, which is code-point order, as Python's; NULLs last.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.context import RunContext
from pipeline.data import erased as erased_users
from pipeline.data import event_log, history, sources
from pipeline.data import extract as in_memory
from pipeline.data.engine import Session, session
from pipeline.data.sources import is_sql_url
from pipeline.storage import paths

STAGE = in_memory.STAGE
ROW_GROUP = 1024 * 1024  # pyarrow's default row group length: pq.write_table's layout
_BATCH = 128 * 1024
_NA = sorted(
    {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A", "NA"}
    | {"NULL", "NaN", "None", "n/a", "nan", "null"}
)  # pandas' default NA strings (pandas._libs.parsers.STR_NA_VALUES)
_WHITESPACE = "".join(c for c in map(chr, range(sys.maxunicode + 1)) if c.isspace())
_UNIT = {"s": (1_000_000_000, 9), "ms": (1_000_000, 6), "us": (1_000, 3), "ns": (1, 0)}  # ns per unit, digits
_NS_MAX = 9_223_372_036_854_775_807  # pandas' datetime64[ns] range: beyond it to_datetime gives NaT
_RAW = "user_id VARCHAR, item_id VARCHAR, timestamp TIMESTAMPTZ, rating DOUBLE, event_type VARCHAR"
_SORT = ", ".join(f'"{c}" NULLS LAST' for c in history.SORT)


def _q(name: str) -> str:
    return '"' + str(name).replace('"', '""') + '"'


def _lit(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _schema(columns: list[str]) -> pa.Schema:
    """The Arrow schema (pandas metadata included) that codecs.parquet_bytes writes for these columns."""
    frame = history.empty()
    if "weight" in columns:
        frame = frame.assign(weight=pd.Series(dtype="float64"))
    return pa.Table.from_pandas(frame[columns], preserve_index=False).schema


class _Sink:
    """A Parquet file written in pq.write_table's row groups (ROW_GROUP rows) from batches."""

    def __init__(self, path: str, schema: pa.Schema) -> None:
        self.path, self.schema, self.rows = path, schema, 0
        self.writer = pq.ParquetWriter(path, schema, compression="zstd")
        self.pending: list[pa.RecordBatch] = []
        self.held = 0

    def add(self, batch: pa.RecordBatch) -> None:
        self.pending.append(batch.select(self.schema.names).cast(self.schema))
        self.held += batch.num_rows
        self.rows += batch.num_rows
        while self.held >= ROW_GROUP:
            table = pa.Table.from_batches(self.pending, self.schema)
            self.writer.write_table(table.slice(0, ROW_GROUP))
            rest = table.slice(ROW_GROUP)
            self.pending, self.held = rest.to_batches(), rest.num_rows

    def close(self) -> bytes:
        if self.held or not self.rows:
            self.writer.write_table(pa.Table.from_batches(self.pending, self.schema))
        self.writer.close()
        data = Path(self.path).read_bytes()
        Path(self.path).unlink()
        return data


def _strip(expr: str) -> str:
    return f"trim(CAST({expr} AS VARCHAR), {_lit(_WHITESPACE)})"


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
    c = _q(col)
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
        r = _q(mapping["rating"])
        numeric = types[mapping["rating"]] in {"FLOAT", "DOUBLE"} or types[mapping["rating"]].endswith("INT")
        rating = f"TRY_CAST({r} AS DOUBLE)" if numeric else f"TRY_CAST(CAST({r} AS VARCHAR) AS DOUBLE)"
        rating = f"CASE WHEN NOT isnan({rating}) THEN {rating} END"  # NaN is pandas' NA
    else:
        rating = "NULL::DOUBLE"
    et = f"lower({_strip(_q(mapping['event_type']))})" if "event_type" in mapping else "NULL"
    s.sql(
        f"INSERT INTO src SELECT {_strip(_q(mapping['user_id']))}, {_strip(_q(mapping['item_id']))}, {ts}, "
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
        na = "[" + ", ".join(_lit(x) for x in _NA) + "]"
        reader = (
            f"read_csv({_lit(path)}, delim = {_lit(src.delimiter)}, header = true, quote = '\"', escape = '\"', "
            f"all_varchar = true, nullstr = {na}, encoding = 'utf-8')"
        )
    else:
        reader = f"read_parquet({_lit(path)})"
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


def _read_source(ctx: RunContext, s: Session, window: history.Window) -> dict[str, Any]:
    """Table `src`: the source's rows for the window (plain files: all rows), normalised."""
    src = ctx.config.source
    s.sql(f"CREATE TABLE src ({_RAW})")
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


def _stage_history(ctx: RunContext, s: Session, keys: list[str]) -> None:
    """View `old0`: the history partitions `keys` in order (`part`, `rn`: file and row)."""
    if not keys:
        s.sql(
            "CREATE VIEW old0 AS SELECT NULL::VARCHAR AS user_id, NULL::VARCHAR AS item_id, "
            "NULL::TIMESTAMPTZ AS timestamp, NULL::DOUBLE AS rating, NULL::VARCHAR AS event_type, "
            "0 AS part, 0::BIGINT AS rn WHERE false"
        )
        return
    files = []
    for n, key in enumerate(keys):
        path = s.path(f"history_{n:06d}.parquet")
        Path(path).write_bytes(ctx.store.get(key))
        files.append(path)
    listed = "[" + ", ".join(_lit(p) for p in files) + "]"
    cols = ", ".join(_q(c) for c in history.COLUMNS)
    s.sql(
        f"CREATE VIEW old0 AS SELECT {cols}, "
        "(regexp_extract(filename, 'history_([0-9]+)\\.parquet$', 1))::INTEGER AS part, file_row_number AS rn "
        f"FROM read_parquet({listed}, filename = true, file_row_number = true)"
    )


def _stream(s: Session, query: str, params: list[Any] | None = None) -> Any:
    return s.con.sql(query, params=params or None).to_arrow_reader(_BATCH)


def _write_partitions(ctx: RunContext, s: Session, end_day) -> tuple[list, int]:
    """One partition per filing day of `win` before `end_day`, sorted on every column."""
    schema = _schema(history.COLUMNS)
    cols = ", ".join(_q(c) for c in history.COLUMNS)
    reader = _stream(s, f"SELECT day, {cols} FROM win WHERE day < ? ORDER BY day, {_SORT}", [end_day])
    written: list = []
    rows = 0
    sink, current = None, None

    def flush() -> None:
        if sink is not None:
            ctx.store.put(history.partition_key(ctx.tenant, current), sink.close())
            written.append(current)

    for batch in reader:
        days = batch.column(0).to_numpy(zero_copy_only=False).astype("datetime64[D]")
        cuts = [0, *(np.flatnonzero(days[1:] != days[:-1]) + 1).tolist(), len(days)]  # sorted: runs of one day
        for a, b in zip(cuts[:-1], cuts[1:], strict=True):
            day = pd.Timestamp(days[a]).date()
            if day != current:
                flush()
                current, sink = day, _Sink(s.path(f"part_{day.isoformat()}.parquet"), schema)
            assert sink is not None
            sink.add(batch.slice(a, b - a))
            rows += b - a
    flush()
    return written, rows


def _scalar_lists(s: Session, query: str) -> dict[str, int]:
    return {str(k): int(v) for k, v in s.con.sql(query).fetchall()}


def extract(ctx: RunContext) -> dict[str, Any]:
    """extract.extract's outputs and result, out of core (see the module docstring)."""
    src = ctx.config.source
    start = history.interval_start(ctx.config.schedule, ctx.interval_end, ctx.interval_start)
    existing = history.partitions(ctx.store, ctx.tenant)
    window = history.plan(list(existing), start, ctx.interval_end, src.lookback_days)
    erased = erased_users.hashes(ctx.store, ctx.tenant)
    cols = ", ".join(_q(c) for c in history.COLUMNS)
    with session(ctx) as s:
        info = _read_source(ctx, s, window)
        logged = event_log.read(ctx.store, ctx.tenant, ctx.interval_end, start=window.start)  # by arrival
        api = in_memory._normalise(logged[history.COLUMNS]) if len(logged) else history.empty()
        api["filed"] = logged["received_at"].astype(api["timestamp"].dtype) if len(logged) else api["timestamp"]
        s.con.register("api_frame", api)
        s.sql(f"CREATE TABLE api AS SELECT {cols}, filed FROM api_frame")
        s.con.unregister("api_frame")
        del api
        old_keys = [k for d, k in existing.items() if window.first_day is not None and d < window.first_day]
        _stage_history(ctx, s, old_keys)
        s.sql(
            f"CREATE VIEW rows AS SELECT {cols}, timestamp AS filed, true AS from_source FROM src "
            f"UNION ALL SELECT {cols}, filed, false FROM api"
        )
        s.con.register("erased", pd.DataFrame({"h": sorted(erased)}, dtype=object))
        s.sql(  # hash each distinct id once, and none while nobody was erased
            "CREATE TABLE gone_users AS SELECT user_id FROM (SELECT DISTINCT user_id FROM rows "
            "WHERE user_id IS NOT NULL UNION SELECT DISTINCT user_id FROM old0 WHERE user_id IS NOT NULL) "
            f"WHERE {'false' if not erased else 'sha256(user_id) IN (SELECT h FROM erased)'}"
        )
        s.sql(
            "CREATE TABLE bounds AS SELECT ?::TIMESTAMPTZ AS t_end, ?::TIMESTAMPTZ AS t_start, ?::TIMESTAMPTZ AS t_api",
            [ctx.interval_end, window.start, window.start or sources.EPOCH],
        )
        s.sql(
            "CREATE VIEW cls AS SELECT *, filed IS NULL AS nat, coalesce(filed >= (SELECT t_end FROM bounds), false) "
            "AS after, coalesce(filed < (SELECT t_start FROM bounds), false) AS before, "
            "coalesce(user_id IN (SELECT user_id FROM gone_users), false) AS gone FROM rows"
        )
        s.sql(
            "CREATE VIEW old AS SELECT * FROM old0 "
            "WHERE user_id IS NULL OR user_id NOT IN (SELECT user_id FROM gone_users)"
        )
        after, nat, gone, late_api = (
            int(x)
            for x in s.one(
                "SELECT count(*) FILTER (after), count(*) FILTER (nat), count(*) FILTER (gone), "
                "count(*) FILTER (NOT from_source AND timestamp < (SELECT t_api FROM bounds)) FROM cls"
            )
        )
        known = [history.DEFAULT_EVENT_TYPE, *src.event_types]
        s.con.register("known", pd.DataFrame({"event_type": known}, dtype=object))
        if src.event_types:  # fail before touching the history
            in_memory.raise_unknown(
                ctx,
                _scalar_lists(
                    s,
                    "SELECT event_type, count(*) FROM cls WHERE (nat OR NOT (after OR before)) AND NOT gone "
                    "AND event_type NOT IN (SELECT event_type FROM known) GROUP BY ALL ORDER BY event_type",
                ),
            )
        old_gone = int(s.one("SELECT count(*) FROM old0 WHERE user_id IN (SELECT user_id FROM gone_users)")[0])
        if info["source_kind"] == "files":  # a plain file is read whole: late = old rows the history lacks
            late_q = (
                f"SELECT {cols} FROM cls WHERE before AND from_source AND NOT gone EXCEPT ALL SELECT {cols} FROM old"
            )
        else:  # partitions and queries return only new rows: any before the window is late
            late_q = "SELECT 1 FROM cls WHERE before AND from_source AND NOT gone"
        late = int(s.one(f"SELECT count(*) FROM ({late_q})")[0])
        s.sql(
            f"CREATE VIEW win AS SELECT CAST(filed AS DATE) AS day, {cols} FROM cls "
            "WHERE NOT (nat OR after OR before OR gone)"
        )
        written, rows_written = _write_partitions(ctx, s, window.end_day)
        deleted = [d for d in existing if window.rewrites(d) and d not in set(written)]
        for day_gone in deleted:
            ctx.store.delete(existing[day_gone])

        # the run's output: history before the window + the window's rows (+ unparseable timestamps)
        s.sql(
            f"CREATE VIEW out0 AS SELECT {cols}, 0 AS grp, part::BIGINT AS k1, rn AS k2 FROM old "
            f"UNION ALL SELECT {cols}, 1, (day - DATE '1970-01-01')::BIGINT, 0 FROM win "
            f"UNION ALL SELECT {cols}, 2, 0, 0 FROM cls WHERE nat AND NOT gone"
        )
        weights = {history.DEFAULT_EVENT_TYPE: 1.0, **src.event_types}
        s.con.register("w", pd.DataFrame({"event_type": list(weights), "weight": list(weights.values())}))
        weight = "w.weight" if src.event_types else "1.0::DOUBLE"
        below = (
            f"coalesce(o.rating < {float(src.rating_threshold)!r}, false)"
            if src.rating_threshold is not None
            else "false"
        )
        s.sql(
            f"CREATE VIEW out AS SELECT o.*, {weight} AS weight, {below} AS below FROM out0 o "
            "LEFT JOIN w USING (event_type)"
        )
        unknown = (
            _scalar_lists(
                s, "SELECT event_type, count(*) FROM out WHERE weight IS NULL GROUP BY ALL ORDER BY event_type"
            )
            if src.event_types
            else {}
        )
        in_memory.raise_unknown(ctx, unknown)
        zero, dropped_below = (
            int(x)
            for x in s.one(
                "SELECT count(*) FILTER (weight = 0), count(*) FILTER (below AND weight IS NOT NULL AND weight <> 0) "
                "FROM out"
            )
        )
        s.sql("CREATE VIEW kept AS SELECT * FROM out WHERE weight IS NOT NULL AND weight <> 0 AND NOT below")
        n, n_users, n_items, lo, hi = s.one(
            "SELECT count(*), count(DISTINCT user_id), count(DISTINCT item_id), min(timestamp), max(timestamp) "
            "FROM kept"
        )
        by_type = _scalar_lists(s, "SELECT event_type, count(*) FROM kept GROUP BY ALL ORDER BY event_type")
        sink = _Sink(s.path("interactions.parquet"), _schema(in_memory.COLUMNS))
        out_cols = ", ".join(_q(c) for c in in_memory.COLUMNS)
        for batch in _stream(s, f"SELECT {out_cols} FROM kept ORDER BY grp, k1, k2, {_SORT}"):
            sink.add(batch)
        key = ctx.write(paths.INTERACTIONS, sink.close())
    counts = {
        "rows": int(n),
        "users": int(n_users),
        "items": int(n_items),
        "min_timestamp": None if lo is None else pd.Timestamp(lo).isoformat(),
        "max_timestamp": None if hi is None else pd.Timestamp(hi).isoformat(),
    }
    run = {
        **info,
        "engine": "duckdb",
        "event_log_rows": len(logged),
        "event_log_late_rows": late_api,
        "dropped_erased_users": gone + old_gone,
        "dropped_after_interval_end": after,
        "late_dropped": late,
        "unparseable_timestamps": nat,
        "history_partitions_written": len(written),
        "history_partitions_deleted": len(deleted),
        "history_rows_written": rows_written,
        "history_partitions_read": len(old_keys),
    }
    weighed = {
        "event_types": by_type,
        "dropped_unknown_event_types": unknown,
        "dropped_zero_weight": zero,
        "dropped_below_rating_threshold": dropped_below,
    }
    return in_memory.finish(ctx, key, start, window, erased, counts, run, weighed)
