"""extract out of core (`data.engine: duckdb`): the in-memory extract's rules, streamed by DuckDB.

pipeline/data/extract.py holds the whole source, the history and the output in pandas at once
(~3.8 GB at 10M events). Here the source's rows go into a disk-backed DuckDB session
(pipeline/data/engine.py: `data.memory_limit_gb`, spilling past it) and every step over all
rows (erasure, the window's cut, late rows, the sorts, the weights) is SQL. The history
partitions and `interactions.parquet` are streamed out in Arrow batches through pyarrow's
writer with the pandas path's schema (its pandas metadata included) and row groups, so both
engines write the same layout and the same rows in the same order
(`tests/unit/test_extract_streamed.py`), and the next stages read either alike.

The source is loaded by pipeline/data/source_duckdb.py (the rules of `_map`/`_normalise`
in SQL; JSON Lines files and SQL results through the pandas readers, one at a time).
* Strings sort bytewise in DuckDB, which is code-point order, as Python's; NULLs last.
"""

from __future__ import annotations

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
from pipeline.data.source_duckdb import lit, q, read_source
from pipeline.storage import paths

STAGE = in_memory.STAGE
ROW_GROUP = 1024 * 1024  # pyarrow's default row group length: pq.write_table's layout
_BATCH = 128 * 1024
_SORT = ", ".join(f'"{c}" NULLS LAST' for c in history.SORT)


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
    listed = "[" + ", ".join(lit(p) for p in files) + "]"
    cols = ", ".join(q(c) for c in history.COLUMNS)
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
    cols = ", ".join(q(c) for c in history.COLUMNS)
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
    cols = ", ".join(q(c) for c in history.COLUMNS)
    with session(ctx) as s:
        info = read_source(ctx, s, window)
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
        out_cols = ", ".join(q(c) for c in in_memory.COLUMNS)
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
