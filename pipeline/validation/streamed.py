"""Validation out of core (`data.engine: duckdb`): exact checks streamed by DuckDB, GX on a sample.

GX's pandas engine holds the batch in memory, several times over; at 100M rows that does not
fit. So the suite is split by what each expectation needs:

* every expectation of the built-in suite is a count over rows (nulls, lengths, ranges, sets,
  compound uniqueness, row counts, the user-hour peak): DuckDB computes those counts EXACTLY
  over the whole batch (streamed, spilling past the memory limit), with GX's own semantics
  (nulls are not "unexpected" except for the null check; `mostly` is a share of the non-null
  rows; a compound key is unexpected on every row of a repeated key), and examples of the
  failing rows. These numbers decide the run;
* GX itself runs the same suite on a deterministic sample (every k-th row of the batch, at
  most `SAMPLE_ROWS`): it gives the column facts (presence, types: one per column, so exact on
  any sample), the tenant's own `expectations:` (arbitrary GX types, judged on the sample and
  marked so) and the Data Docs pages, which therefore show sample counts;
* the report's `expectations` entries carry `evaluated_on`: "all rows (duckdb)" or "sample".
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from pipeline.data.engine import Session
from pipeline.storage import paths
from pipeline.validation import checks
from pipeline.validation import report as reporting

SAMPLE_ROWS = 100_000
_HOUR_US = 3_600_000_000
_COUNTED = {
    "expect_column_values_to_not_be_null",
    "expect_column_value_lengths_to_be_between",
    "expect_column_values_to_be_between",
    "expect_column_values_to_be_in_set",
    "expect_compound_columns_to_be_unique",
    "expect_table_row_count_to_be_between",
}


def _q(col: str) -> str:
    return '"' + col.replace('"', '""') + '"'


def prepare(ctx: Any, s: Session, start: pd.Timestamp, end: pd.Timestamp, read_since, catalog) -> list[str]:
    """Views `src` (the extract), `batch` (what GX sees, with the derived columns) and table
    `uh` (events per user and clock hour in the interval). Returns the extract's columns."""
    path = s.stage_in(ctx, paths.INTERACTIONS)
    s.sql(f"CREATE VIEW src AS SELECT * FROM read_parquet({path}, file_row_number = true)")
    columns = [c for c in s.fetch_df("SELECT * FROM src LIMIT 0").columns if c != "file_row_number"]
    s.sql("CREATE TABLE bounds AS SELECT ?::TIMESTAMPTZ AS t0, ?::TIMESTAMPTZ AS t1", [start, end])
    s.sql(
        f"CREATE TABLE uh AS SELECT user_id, epoch_us(timestamp) // {_HOUR_US} AS hour, count(*) AS n FROM src "
        "WHERE timestamp >= (SELECT t0 FROM bounds) AND timestamp < (SELECT t1 FROM bounds) "
        "AND user_id IS NOT NULL GROUP BY ALL"
    )
    derived = ""  # the catalog column exists only with a catalog, as in the in-memory batch
    if catalog is not None:
        s.con.register("catalog_ids", pd.DataFrame({"item_id": catalog["item_id"].astype(str).to_numpy(dtype=object)}))
        derived = f", coalesce(item_id IN (SELECT item_id FROM catalog_ids), false) AS {checks.IN_CATALOG}"
    since = "TRUE"
    if read_since is not None:
        s.sql("CREATE TABLE since AS SELECT ?::TIMESTAMPTZ AS t", [read_since])
        since = (
            "(timestamp IS NULL OR timestamp >= (SELECT t FROM since) "
            "OR (timestamp >= (SELECT t0 FROM bounds) AND timestamp < (SELECT t1 FROM bounds)))"
        )
    s.sql(f"CREATE VIEW batch AS SELECT *{derived} FROM src WHERE {since}")
    return columns


def _interval(exp: Any) -> str:
    """Every row condition the suite builds is the data interval (checks.build)."""
    if getattr(exp, "row_condition", None) is None:
        return "TRUE"
    return "timestamp >= (SELECT t0 FROM bounds) AND timestamp < (SELECT t1 FROM bounds)"


def _values(kw: dict[str, Any], key: str) -> Any:
    v = kw.get(key)
    return pd.Timestamp(v).to_pydatetime() if isinstance(v, pd.Timestamp) else v


def exact(s: Session, exp: Any, columns: list[str]) -> dict[str, Any] | None:
    """GX's result fields for `exp` computed over every row, or None where only GX can judge."""
    cfg = exp.configuration
    kind, kw = cfg.type, dict(cfg.kwargs)
    if kind not in _COUNTED:
        return None
    where = _interval(exp)
    col = kw.get("column")
    if col is not None and col not in [*columns, checks.IN_CATALOG, checks.USER_HOUR]:
        return None  # GX reports the missing column
    mostly = float(kw.get("mostly") or 1.0)
    if kind == "expect_table_row_count_to_be_between":
        n = int(s.one(f"SELECT count(*) FROM batch WHERE {where}")[0])
        lo, hi = kw.get("min_value"), kw.get("max_value")
        ok = (lo is None or n >= lo) and (hi is None or n <= hi)
        return {"success": ok, "observed_value": n}
    if col == checks.USER_HOUR:  # each interval row carries its user's events in that hour
        limit = kw.get("max_value")
        n = int(s.one(f"SELECT count(*) FROM batch WHERE {where} AND user_id IS NOT NULL")[0])
        bad = int(s.one("SELECT coalesce(sum(n), 0) FROM uh WHERE n > ?", [limit])[0])
        examples = s.fetch_df(
            f"SELECT uh.n FROM batch b JOIN uh ON uh.user_id = b.user_id AND uh.hour = epoch_us(b.timestamp) // "
            f"{_HOUR_US} WHERE {where} AND uh.n > ? ORDER BY b.file_row_number LIMIT 5",
            [limit],
        )["n"].tolist()
        return _counted(n, n, bad, mostly, examples)
    if kind == "expect_compound_columns_to_be_unique":
        key = ", ".join(_q(c) for c in kw["column_list"])
        present = " OR ".join(f"{_q(c)} IS NOT NULL" for c in kw["column_list"])
        n, nonnull, bad = s.one(
            f"SELECT (SELECT count(*) FROM batch WHERE {where}), coalesce(sum(c), 0), "
            f"coalesce(sum(c) FILTER (c > 1), 0) FROM (SELECT count(*) AS c FROM batch "
            f"WHERE {where} AND ({present}) GROUP BY {key})"
        )
        using = ", ".join(_q(c) for c in kw["column_list"])
        rows = s.fetch_df(  # GX's examples: the first unexpected rows, in row order
            f"WITH d AS (SELECT {key} FROM batch WHERE {where} AND ({present}) GROUP BY {key} HAVING count(*) > 1) "
            f"SELECT {key} FROM batch JOIN d USING ({using}) WHERE {where} ORDER BY file_row_number LIMIT 5"
        )
        return _counted(int(n), int(nonnull), int(bad), mostly, rows.to_dict("records"))
    c = _q(str(col))
    if kind == "expect_column_values_to_not_be_null":
        n, bad = s.one(f"SELECT count(*), count(*) FILTER ({c} IS NULL) FROM batch WHERE {where}")
        return _counted(int(n), int(n), int(bad), mostly, [])
    params: list[Any] = []
    if kind == "expect_column_value_lengths_to_be_between":
        lo, hi = kw.get("min_value"), kw.get("max_value")
        parts = [f"length({c}) < {int(lo)}"] if lo is not None else []
        parts += [f"length({c}) > {int(hi)}"] if hi is not None else []
        cond = " OR ".join(parts)
    elif kind == "expect_column_values_to_be_between":
        lo, hi = _values(kw, "min_value"), _values(kw, "max_value")
        parts = []
        if lo is not None:
            parts.append(f"{c} < ?")
            params.append(lo)
        if hi is not None:
            parts.append(f"{c} > ?")
            params.append(hi)
        cond = " OR ".join(parts)
    else:  # in set
        allowed = list(kw.get("value_set") or [])
        cond = f"{c} NOT IN ({', '.join('?' * len(allowed))})" if allowed else "TRUE"
        params = allowed
    cond = cond or "FALSE"
    n, nonnull, bad = s.one(
        f"SELECT count(*), count({c}), count(*) FILTER ({c} IS NOT NULL AND ({cond})) FROM batch WHERE {where}",
        params,
    )
    examples = s.fetch_df(f"SELECT {c} AS v FROM batch WHERE {where} AND {c} IS NOT NULL AND ({cond}) LIMIT 5", params)[
        "v"
    ].tolist()
    return _counted(int(n), int(nonnull), int(bad), mostly, examples)


def _counted(n: int, nonnull: int, bad: int, mostly: float, examples: list) -> dict[str, Any]:
    share_ok = (nonnull - bad) / nonnull if nonnull else 1.0
    return {
        "success": share_ok >= mostly - 1e-12,
        "element_count": n,
        "unexpected_count": bad,
        "unexpected_percent": 100.0 * bad / nonnull if nonnull else 0.0,
        "partial_unexpected_list": [reporting._short(x) for x in examples[:5]],
        "partial_unexpected_index_list": [],
    }


def sample(s: Session) -> pd.DataFrame:
    """Every k-th row of the batch (at most SAMPLE_ROWS), with the user-hour column GX checks."""
    n = int(s.one("SELECT count(*) FROM batch")[0])
    step = max(1, math.ceil(n / SAMPLE_ROWS))
    df = s.fetch_df(
        f"SELECT b.* EXCLUDE (file_row_number), uh.n::DOUBLE AS {checks.USER_HOUR} FROM batch b "
        f"LEFT JOIN uh ON uh.user_id = b.user_id AND uh.hour = epoch_us(b.timestamp) // {_HOUR_US} "
        "AND b.timestamp >= (SELECT t0 FROM bounds) AND b.timestamp < (SELECT t1 FROM bounds) "
        f"WHERE b.file_row_number % {step} = 0 ORDER BY b.file_row_number"
    )
    return df


def key_of(cfg: Any) -> tuple:
    """Identifies an expectation (suite or result side) by type, check, column(s) and description."""
    kw = cfg.kwargs
    return (cfg.type, (cfg.meta or {}).get("check"), str(kw.get("column") or kw.get("column_list")), cfg.description)


def merge(results: list[Any], described: list[dict[str, Any]], exact_by_key: dict[tuple, dict | None]) -> None:
    """Put the exact counts into the entries of GX's sample results, in place."""
    for r, entry in zip(results, described, strict=True):
        got = exact_by_key.get(key_of(r.expectation_config))
        if got is None:
            entry["evaluated_on"] = "sample"
        else:
            entry.update(got)
            entry["evaluated_on"] = "all rows (duckdb)"


def stats(s: Session, spec, frame: checks.Frame, has_catalog: bool) -> dict[str, Any]:
    """validate's `_stats`, computed over the whole extract by DuckDB."""
    inside = "timestamp >= (SELECT t0 FROM bounds) AND timestamp < (SELECT t1 FROM bounds)"
    max_ts, interval_events = s.one(f"SELECT max(timestamp), count(*) FILTER ({inside}) FROM src")
    peak = s.one("SELECT coalesce(max(n), 0) FROM uh")[0]
    out: dict[str, Any] = {
        "start": frame.start,
        "end": frame.end,
        "max_timestamp": checks._fmt_ts(max_ts) if max_ts is not None else None,
        "interval_events": int(interval_events),
        "peak_user_hour": int(peak),
    }
    out["bad_event_types"] = {}
    if "event_type" in frame.columns:
        allowed = list(frame.event_types)
        marks = ", ".join("?" * len(allowed)) or "NULL"
        bad = s.fetch_df(
            f"SELECT event_type, count(*) AS n FROM src WHERE event_type IS NOT NULL AND event_type NOT IN ({marks}) "
            "GROUP BY ALL ORDER BY n DESC, event_type LIMIT 5",
            allowed,
        )
        out["bad_event_types"] = {str(k): int(v) for k, v in zip(bad["event_type"], bad["n"], strict=True)}
    bots = s.fetch_df(
        "SELECT user_id, max(n) AS events, arg_min(hour, [-n, hour]) AS hour FROM uh WHERE n > ? "
        "GROUP BY user_id ORDER BY events DESC, user_id",
        [spec.bot_users.max_events_per_hour],
    )
    out["bots"] = [
        {
            "user_id": str(u),
            "events": int(n),
            "hour": checks._fmt_ts(pd.Timestamp(int(h) * _HOUR_US, unit="us", tz="UTC")),
        }
        for u, n, h in zip(bots["user_id"], bots["events"], bots["hour"], strict=True)
    ]
    if has_catalog:
        unknown = s.fetch_df(
            f"SELECT item_id, count(*) AS n FROM src WHERE {inside} AND item_id IS NOT NULL "
            "AND item_id NOT IN (SELECT item_id FROM catalog_ids) GROUP BY ALL ORDER BY n DESC, item_id LIMIT 5"
        )
        out["unknown_items"] = [str(x) for x in unknown["item_id"]]
    median, floor, _ = checks.volume_floor(frame.history, spec.volume)
    if median is not None and floor is not None:
        out["volume"] = {
            "median": median,
            "runs": len(frame.history),
            "change": int(interval_events) / median - 1,
            "max_drop": spec.volume.max_drop,
        }
    return out


def totals(s: Session, dup_key: list[str], bots: list[str]) -> dict[str, Any]:
    """Rows, rows checked, duplicate rows in the interval (pandas' `duplicated`), rows of filtered bots."""
    inside = "timestamp >= (SELECT t0 FROM bounds) AND timestamp < (SELECT t1 FROM bounds)"
    key = ", ".join(_q(c) for c in dup_key)
    rows, checked = s.one("SELECT (SELECT count(*) FROM src), (SELECT count(*) FROM batch)")
    dup = s.one(f"SELECT coalesce(sum(c - 1), 0) FROM (SELECT count(*) AS c FROM src WHERE {inside} GROUP BY {key})")[0]
    s.con.register("bots", pd.DataFrame({"user_id": pd.Series(bots, dtype=object)}))
    filtered = s.one("SELECT count(*) FROM src WHERE user_id IN (SELECT user_id FROM bots)")[0]
    return {"rows": int(rows), "rows_checked": int(checked), "duplicate_rows": int(dup), "filtered_rows": int(filtered)}
