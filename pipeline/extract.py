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

from pipeline import event_log
from pipeline.context import RunContext
from pipeline.storage import codecs

STAGE = "extract"
OUTPUT = "interactions.parquet"
CATALOG = "catalog.parquet"
CANONICAL = ["user_id", "item_id", "timestamp", "rating"]
_SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


def source_files(ctx: RunContext, uri: str, fmt: str = "auto", field: str = "source.uri") -> list[tuple[str, bytes]]:
    """(name, bytes) of every file of a source (file, folder, s3 object or prefix), sorted."""
    wanted = set(_SUFFIXES) if fmt == "auto" else {s for s, f in _SUFFIXES.items() if f == fmt}
    if uri.startswith("s3://"):
        from pipeline.storage.s3 import S3Store

        store = S3Store(uri.rstrip("/"))
        if store.exists(""):
            return [(uri, store.get(""))]
        keys = [k for k in store.list("") if Path(k).suffix.lower() in wanted]
        if not keys:
            raise ctx.error(STAGE, f"{field} {uri}: no {sorted(wanted)} objects found")
        return [(store.uri(k), store.get(k)) for k in keys]
    path = Path(uri)
    if not path.is_absolute():
        path = ctx.settings.data_root / path
    if path.is_file():
        return [(str(path), path.read_bytes())]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in wanted)
        if not files:
            raise ctx.error(STAGE, f"{field} {path}: folder has no {sorted(wanted)} files")
        return [(str(p), p.read_bytes()) for p in files]
    raise ctx.error(STAGE, f"{field} {path}: no such file or folder")


def _read_table(ctx: RunContext, name: str, data: bytes, fmt: str, delimiter: str, id_cols: list[str]) -> pd.DataFrame:
    fmt = fmt if fmt != "auto" else _SUFFIXES.get(Path(name).suffix.lower(), "csv")
    try:
        if fmt == "csv":
            return pd.read_csv(
                io.BytesIO(data), sep=delimiter, dtype=dict.fromkeys(id_cols, "string"), encoding="utf-8"
            )
        return codecs.read_parquet(data)
    except UnicodeDecodeError as exc:
        raise ctx.error(STAGE, f"file {name}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    except Exception as exc:  # parser errors vary by engine; say which file and why
        raise ctx.error(STAGE, f"file {name}: unreadable as {fmt}: {exc}") from None


def _read_one(ctx: RunContext, name: str, data: bytes) -> pd.DataFrame:
    src = ctx.config.source
    cols = src.columns
    df = _read_table(ctx, name, data, src.format, src.delimiter, [cols.user_id, cols.item_id])
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
    files = source_files(ctx, ctx.config.source.uri, ctx.config.source.format)
    frames = [_read_one(ctx, name, data) for name, data in files]
    logged = event_log.read(ctx.store, ctx.tenant, ctx.interval_end)
    if len(logged):
        frames.append(logged[CANONICAL])
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
    catalog = _catalog(ctx) if ctx.config.catalog else None
    valid_ts = df["timestamp"].dropna()
    result = {
        "uri": ctx.store.uri(key),
        "key": key,
        "files": len(files),
        "event_log_rows": len(logged),
        "catalog_items": None if catalog is None else len(catalog),
        "rows": len(df),
        "users": int(df["user_id"].nunique()),
        "items": int(df["item_id"].nunique()),
        "dropped_after_interval_end": dropped,
        "min_timestamp": valid_ts.min().isoformat() if len(valid_ts) else None,
        "max_timestamp": valid_ts.max().isoformat() if len(valid_ts) else None,
    }
    log.info(
        "extract: %d files + %d API events, %d rows (%d users, %d items), %d events at/after %s dropped%s",
        len(files),
        len(logged),
        result["rows"],
        result["users"],
        result["items"],
        dropped,
        end.isoformat(),
        "" if catalog is None else f"; catalog {len(catalog)} items",
    )
    return ctx.write_result(STAGE, result)


def _catalog(ctx: RunContext) -> pd.DataFrame:
    """The item catalog: item_id, category (or null), tags (list of str), title; one row per item."""
    cat = ctx.config.catalog
    cols = cat.columns
    frames = []
    for name, data in source_files(ctx, cat.uri, cat.format, "catalog.uri"):
        raw = _read_table(ctx, name, data, cat.format, cat.delimiter, [cols.item_id])
        wanted = {"item_id": cols.item_id, "category": cols.category, "tags": cols.tags, "title": cols.title}
        missing = [f"{c!r} (catalog.columns.{f})" for f, c in wanted.items() if c and c not in raw.columns]
        if missing:
            raise ctx.error(
                STAGE, f"catalog file {name}: column {', '.join(missing)} not found; present: {list(raw.columns)}"
            )
        frames.append(pd.DataFrame({f: raw[c] if c else pd.NA for f, c in wanted.items()}))
    df = pd.concat(frames, ignore_index=True)
    df["item_id"] = df["item_id"].astype("string").str.strip()
    df = df.dropna(subset=["item_id"]).drop_duplicates("item_id", keep="last")
    df["category"] = df["category"].astype("string").str.strip().replace("", pd.NA)
    df["title"] = df["title"].astype("string")
    tags = (
        df[["item_id"]]
        .assign(tag=df["tags"].astype("string").str.split(cat.tags_separator, regex=False))
        .explode("tag")
        .assign(tag=lambda t: t["tag"].astype("string").str.strip())
    )
    tags = tags[tags["tag"].fillna("") != ""].drop_duplicates().sort_values(["item_id", "tag"])
    df = df.sort_values("item_id", kind="stable").reset_index(drop=True)
    lists = tags.assign(tag=tags["tag"].astype(object)).groupby("item_id")["tag"].agg(list)
    df["tags"] = df["item_id"].map(lists).astype(object)  # Parquet list<string>; null: no tags
    ctx.store.put(ctx.key(STAGE, CATALOG), codecs.parquet_bytes(df))
    return df


def load_catalog(ctx: RunContext) -> pd.DataFrame | None:
    """The run's catalog, or None when the tenant has none."""
    if not ctx.config.catalog:
        return None
    return codecs.read_parquet(ctx.store.get(ctx.key(STAGE, CATALOG)))


def load(ctx: RunContext) -> pd.DataFrame:
    return codecs.read_parquet(ctx.store.get(ctx.key(STAGE, OUTPUT)))
