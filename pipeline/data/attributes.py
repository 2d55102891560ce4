"""The tenant's optional side tables: the item catalog and user attributes.

Read by the extract stage from their own sources (`catalog:`, `users:`) and written beside its
interactions (`paths.CATALOG`, `paths.USER_ATTRIBUTES`), one row per item or
user, sorted, so the same input gives the same bytes. validate, features and publish read
them back with `load_catalog` / `load_users`.
"""

from __future__ import annotations

import pandas as pd

from pipeline.context import RunContext
from pipeline.data import sources
from pipeline.data.erased import erased_mask
from pipeline.data.sources import is_sql_url
from pipeline.storage import codecs, paths

STAGE = "extract"  # part of the extract stage's output


def extract_catalog(ctx: RunContext, read: sources.Reader) -> pd.DataFrame | None:
    """The item catalog: item_id, category (or null), tags (list of str), title; one row per item.
    None when the tenant has no `catalog:`."""
    cat = ctx.config.catalog
    if cat is None:
        return None
    cols = cat.columns
    frames = []
    for name, data in read.files(cat.uri, cat.format, "catalog.uri"):
        raw = read.table(name, data, cat.format, cat.delimiter, [cols.item_id])
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
    ctx.write(paths.CATALOG, codecs.parquet_bytes(df))
    return df


def extract_users(ctx: RunContext, read: sources.Reader, erased: frozenset[str] = frozenset()) -> pd.DataFrame | None:
    """User attributes: user_id (string) + the mapped attribute columns; one row per user (the
    last one read wins), sorted by user_id. None when the tenant has no `users:`."""
    cfg = ctx.config.users
    if cfg is None:
        return None
    uid = cfg.columns.user_id
    attrs = cfg.columns.attributes
    if attrs is not None and "user_id" in attrs:
        raise ctx.error(STAGE, "users.columns.attributes: 'user_id' is reserved for the user id column")
    if is_sql_url(cfg.uri):
        params = {"start": sources.EPOCH, "end": ctx.interval_end}
        raws = [("users query result", read.sql(cfg.uri, cfg.query or "", params, "users"))]
    else:
        raws = [
            (name, read.table(name, data, cfg.format, cfg.delimiter, [uid]))
            for name, data in read.files(cfg.uri, cfg.format, "users.uri")
        ]
    frames = []
    for name, raw in raws:
        wanted = {"user_id": uid, **(attrs if attrs is not None else {c: c for c in raw.columns if c != uid})}
        missing = [
            f"{c!r} (users.columns.{'user_id' if f == 'user_id' else 'attributes.' + f})"
            for f, c in wanted.items()
            if c not in raw.columns
        ]
        if missing:
            raise ctx.error(
                STAGE,
                f"users file {name}: column {', '.join(missing)} not found; present: {list(map(str, raw.columns))}",
            )
        frames.append(pd.DataFrame({f: raw[c] for f, c in wanted.items()}))
    df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    df["user_id"] = df["user_id"].astype("string").str.strip()
    df = df.dropna(subset=["user_id"]).drop_duplicates("user_id", keep="last")
    for col in df.columns:  # text attributes: one string dtype, whatever the reader produced
        if df[col].dtype == object or pd.api.types.is_string_dtype(df[col]):
            df[col] = df[col].astype("string")
    if erased:  # users deleted on request (pipeline/data/erased.py)
        df = df[~erased_mask(df["user_id"], erased)]
    df = df.sort_values("user_id", kind="stable").reset_index(drop=True)
    ctx.write(paths.USER_ATTRIBUTES, codecs.parquet_bytes(df))
    return df


def load_catalog(ctx: RunContext) -> pd.DataFrame | None:
    """The run's catalog, or None when the tenant has none."""
    if not ctx.config.catalog:
        return None
    return ctx.read_parquet(paths.CATALOG)


def load_users(ctx: RunContext) -> pd.DataFrame | None:
    """The run's user attributes, or None when the tenant has none."""
    if not ctx.config.users:
        return None
    return ctx.read_parquet(paths.USER_ATTRIBUTES)
