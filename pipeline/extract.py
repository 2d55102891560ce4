"""extract: read the tenant's source, map columns, normalise types, keep events before the interval end.

Output: `runs/{run}/extract/interactions.parquet` with the canonical schema
(user_id: string, item_id: string, timestamp: UTC, rating: float64 or NaN), sorted so that
the same input always gives byte-identical Parquet.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.context import RunContext
from pipeline.storage import codecs

STAGE = "extract"
OUTPUT = "interactions.parquet"
CANONICAL = ["user_id", "item_id", "timestamp", "rating"]
_SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


def _source_files(ctx: RunContext) -> list[tuple[str, bytes]]:
    """(name, bytes) of every file of the source, in sorted order."""
    uri = ctx.config.source.uri
    wanted = (
        set(_SUFFIXES)
        if ctx.config.source.format == "auto"
        else {s for s, f in _SUFFIXES.items() if f == ctx.config.source.format}
    )
    if uri.startswith("s3://"):
        from pipeline.storage.s3 import S3Store

        store = S3Store(uri.rstrip("/"))
        if store.exists(""):
            return [(uri, store.get(""))]
        keys = [k for k in store.list("") if Path(k).suffix.lower() in wanted]
        if not keys:
            raise ctx.error(STAGE, f"source.uri {uri}: no {sorted(wanted)} objects found")
        return [(store.uri(k), store.get(k)) for k in keys]
    path = Path(uri)
    if not path.is_absolute():
        path = ctx.settings.data_root / path
    if path.is_file():
        return [(str(path), path.read_bytes())]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in wanted)
        if not files:
            raise ctx.error(STAGE, f"source.uri {path}: folder has no {sorted(wanted)} files")
        return [(str(p), p.read_bytes()) for p in files]
    raise ctx.error(STAGE, f"source.uri {path}: no such file or folder")


def _read_one(ctx: RunContext, name: str, data: bytes) -> pd.DataFrame:
    src = ctx.config.source
    fmt = src.format if src.format != "auto" else _SUFFIXES.get(Path(name).suffix.lower(), "csv")
    cols = src.columns
    id_cols = {cols.user_id: "string", cols.item_id: "string"}
    try:
        if fmt == "csv":
            df = pd.read_csv(io.BytesIO(data), sep=src.delimiter, dtype=id_cols, encoding="utf-8")
        else:
            df = codecs.read_parquet(data)
    except UnicodeDecodeError as exc:
        raise ctx.error(STAGE, f"file {name}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    except Exception as exc:  # parser errors vary by engine; say which file and why
        raise ctx.error(STAGE, f"file {name}: unreadable as {fmt}: {exc}") from None
    mapping = {"user_id": cols.user_id, "item_id": cols.item_id, "timestamp": cols.timestamp}
    if cols.rating:
        mapping["rating"] = cols.rating
    missing = [
        f"{src_col!r} (source.columns.{field})" for field, src_col in mapping.items() if src_col not in df.columns
    ]
    if missing:
        raise ctx.error(
            STAGE, f"file {name}: column {', '.join(missing)} not found; columns present: {list(map(str, df.columns))}"
        )
    out = pd.DataFrame({field: df[src_col] for field, src_col in mapping.items()})
    if "rating" not in out:
        out["rating"] = np.nan
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


def extract(ctx: RunContext) -> dict[str, Any]:
    log = ctx.logger(STAGE)
    files = _source_files(ctx)
    frames = [_read_one(ctx, name, data) for name, data in files]
    df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    df["user_id"] = df["user_id"].astype("string").str.strip()
    df["item_id"] = df["item_id"].astype("string").str.strip()
    df["timestamp"] = _normalise_timestamps(ctx, df["timestamp"])
    df["rating"] = pd.to_numeric(df["rating"], errors="coerce").astype("float64")
    end = pd.Timestamp(ctx.interval_end)
    # NaT rows are kept on purpose: validation reports them instead of extract hiding them.
    keep = df["timestamp"].isna() | (df["timestamp"] < end)
    dropped = int((~keep).sum())
    df = df.loc[keep, CANONICAL].sort_values(["timestamp", "user_id", "item_id"], kind="stable", na_position="last")
    df = df.reset_index(drop=True)
    key = ctx.key(STAGE, OUTPUT)
    ctx.store.put(key, codecs.parquet_bytes(df))
    valid_ts = df["timestamp"].dropna()
    result = {
        "uri": ctx.store.uri(key),
        "key": key,
        "files": len(files),
        "rows": len(df),
        "users": int(df["user_id"].nunique()),
        "items": int(df["item_id"].nunique()),
        "dropped_after_interval_end": dropped,
        "min_timestamp": valid_ts.min().isoformat() if len(valid_ts) else None,
        "max_timestamp": valid_ts.max().isoformat() if len(valid_ts) else None,
    }
    log.info(
        "extract: %d files, %d rows (%d users, %d items), %d events at/after %s dropped",
        len(files),
        result["rows"],
        result["users"],
        result["items"],
        dropped,
        end.isoformat(),
    )
    return ctx.write_result(STAGE, result)


def load(ctx: RunContext) -> pd.DataFrame:
    return codecs.read_parquet(ctx.store.get(ctx.key(STAGE, OUTPUT)))
