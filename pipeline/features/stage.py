"""features: contiguous id maps and a per-user temporal holdout.

Each user's events are ordered by time; the last `holdout_fraction` of them (floored, so
users with fewer than 1/fraction events have no holdout) are held out for evaluation. The
published model is refit on everything (the refit stage), so nothing recent is lost.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.context import RunContext, StageIO
from pipeline.data import attributes
from pipeline.features import tables as feature_tables
from pipeline.features.dataset import TOKEN_BUCKETS, Features, temporal_holdout
from pipeline.storage import codecs, paths

STAGE = "features"
IO = StageIO(
    reads=(paths.INTERACTIONS, paths.EXCLUDED_USERS, paths.CATALOG),
    writes=(paths.USERS, paths.ITEMS, paths.EVENTS, paths.ITEM_FEATURES, paths.USER_STATS, paths.ITEM_STATS),
)


def _lists(rows: np.ndarray, codes: np.ndarray, width: int, n_items: int) -> pa.Array:
    """list<int32> per item from (row, code) pairs, deduplicated and sorted; rows without codes get []."""
    pairs = np.unique(rows.astype(np.int64) * width + codes.astype(np.int64))
    offsets = np.concatenate(([0], np.cumsum(np.bincount(pairs // width, minlength=n_items))))
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array((pairs % width).astype(np.int32)))


def item_feature_table(item_ids: pd.Series, catalog: pd.DataFrame) -> pd.DataFrame:
    """Model inputs per item, row = item_idx: category code (-1: none), tag codes, hashed title tokens.

    Categories and tags are coded in sorted order of their names; title tokens (lower-cased
    words) are hashed into TOKEN_BUCKETS buckets (pandas' fixed-key SipHash: stable across
    runs and machines). Items missing from the catalog get -1 and empty lists.
    """
    attrs = pd.DataFrame({"item_id": item_ids.astype("string").to_numpy()}).merge(
        catalog[["item_id", "category", "tags", "title"]].astype({"item_id": "string"}),
        on="item_id",
        how="left",
        validate="one_to_one",
    )
    n = len(attrs)
    category, _ = pd.factorize(attrs["category"], sort=True)
    tags = attrs["tags"].explode().dropna().astype("string")
    tag_codes, tag_names = pd.factorize(tags, sort=True)
    words = attrs["title"].astype("string").str.lower().str.findall(r"\w+").explode().dropna()
    buckets = pd.util.hash_array(words.to_numpy(dtype=object)) % TOKEN_BUCKETS
    return pd.DataFrame(
        {
            "item_idx": np.arange(n, dtype=np.int32),
            "category": category.astype(np.int32),
            "tags": pd.arrays.ArrowExtensionArray(_lists(tags.index.to_numpy(), tag_codes, max(len(tag_names), 1), n)),
            "tokens": pd.arrays.ArrowExtensionArray(_lists(words.index.to_numpy(), buckets, TOKEN_BUCKETS, n)),
        }
    )


def features(ctx: RunContext) -> dict[str, Any]:
    excluded = ctx.read_parquet(paths.EXCLUDED_USERS)["user_id"]
    catalog = attributes.load_catalog(ctx)
    if ctx.config.data.engine == "duckdb":
        return _streamed(ctx, excluded, catalog)
    df = ctx.read_parquet(paths.INTERACTIONS)
    df = df[["user_id", "item_id", "timestamp", "rating", "weight"]] if "weight" in df else df.assign(weight=1.0)
    keep = df["user_id"].notna() & df["item_id"].notna() & df["timestamp"].notna()
    if len(excluded):  # users validation flagged (bots): their events never reach training
        keep &= ~df["user_id"].isin(excluded)
    df = df[keep]
    user_idx, user_ids = pd.factorize(df["user_id"], sort=True)
    item_idx, item_ids = pd.factorize(df["item_id"], sort=True)
    _check_sizes(ctx, len(user_ids), len(item_ids))
    if catalog is not None:  # catalog items without events get an index too: models can still vector them
        item_ids = pd.Index(item_ids).union(pd.Index(catalog["item_id"].dropna().unique()))
        item_idx = item_ids.get_indexer(df["item_id"])
    ts = df["timestamp"].dt.tz_convert(None).to_numpy("datetime64[us]").astype(np.int64)
    holdout = temporal_holdout(user_idx, ts, item_idx, ctx.config.features.holdout_fraction)
    events = (
        pd.DataFrame(
            {
                "user_idx": user_idx.astype(np.int32),
                "item_idx": item_idx.astype(np.int32),
                "timestamp": df["timestamp"].array,  # keeps datetime64[us, UTC]; to_numpy() boxes every row
                "rating": df["rating"].to_numpy(dtype=np.float64),
                "weight": df["weight"].to_numpy(dtype=np.float64),  # source.event_types: models' confidence
                "holdout": holdout,
            }
        )
        .sort_values(["user_idx", "timestamp", "item_idx"], kind="stable")
        .reset_index(drop=True)
    )
    del df, user_idx, item_idx, ts, holdout  # the string-keyed table is the largest thing held: free it early
    n_u, n_i = len(user_ids), len(item_ids)
    tr = ~events["holdout"].to_numpy()
    uidx, iidx = events["user_idx"].to_numpy(), events["item_idx"].to_numpy()
    users = pd.DataFrame(
        {
            "user_id": pd.array(user_ids, dtype="string"),
            "user_idx": np.arange(n_u, dtype=np.int32),
            "n_events": np.bincount(uidx, minlength=n_u),
            "n_train": np.bincount(uidx[tr], minlength=n_u),
            "n_holdout": np.bincount(uidx[~tr], minlength=n_u),
        }
    )
    items = pd.DataFrame(
        {
            "item_id": pd.array(item_ids, dtype="string"),
            "item_idx": np.arange(n_i, dtype=np.int32),
            "n_events": np.bincount(iidx, minlength=n_i),
            "n_train": np.bincount(iidx[tr], minlength=n_i),
        }
    )
    rel = Features(users=users, items=items, events=events).relevant()
    counts = {
        "events": len(events),
        "train_events": int(tr.sum()),
        "holdout_events": int((~tr).sum()),
        "holdout_users": int((np.diff(rel.indptr) > 0).sum()),
        "relevant_pairs": int(rel.nnz),
    }
    cat = _indexed_catalog(items, catalog)
    # descriptive user/item statistics as of the interval end (offline; users' go online in Redis)
    u_stats = feature_tables.user_features(_indexed_events(events), ctx.interval_end, cat)
    i_stats = feature_tables.item_features(_indexed_events(events), ctx.interval_end, cat)
    return _finish(ctx, users, items, catalog, u_stats, i_stats, counts, len(excluded), events=events)


def _streamed(ctx: RunContext, excluded: pd.Series, catalog: pd.DataFrame | None) -> dict[str, Any]:
    """The same tables out of core (pipeline/features/streamed.py); EVENTS is written by DuckDB."""
    from pipeline.data import engine
    from pipeline.features import streamed

    cat_ids = None if catalog is None else pd.Series(catalog["item_id"].dropna().unique())
    with engine.session(ctx) as s:
        # the catalog keyed by item index needs the items table: built after numbering, inside `build`
        out = streamed.build(
            ctx, s, excluded, cat_ids, catalog, lambda n_u, n_i: _check_sizes(ctx, n_u, n_i), _indexed_catalog
        )
    return _finish(ctx, out.users, out.items, catalog, out.user_stats, out.item_stats, out.counts, len(excluded))


def _check_sizes(ctx: RunContext, n_users: int, n_items: int) -> None:
    cfg = ctx.config.features
    if n_users < cfg.min_users or n_items < cfg.min_items:
        raise ctx.error(
            STAGE,
            f"too few to train: {n_users} users (features.min_users={cfg.min_users}), "
            f"{n_items} items (features.min_items={cfg.min_items})",
        )


def _finish(ctx, users, items, catalog, u_stats, i_stats, counts, n_excluded, events=None) -> dict[str, Any]:
    """Write the tables (EVENTS too when given) and the result; both paths end here."""
    log = ctx.logger(STAGE)
    if counts["holdout_users"] == 0:
        raise ctx.error(
            STAGE,
            "no user has enough events for a holdout "
            f"(features.holdout_fraction={ctx.config.features.holdout_fraction}); cannot evaluate",
        )
    u_stats["user_id"] = users["user_id"].to_numpy()[u_stats["user_id"].to_numpy()]
    i_stats["item_id"] = items["item_id"].to_numpy()[i_stats["item_id"].to_numpy()]
    tables = {paths.USERS: users, paths.ITEMS: items}
    if events is not None:
        tables[paths.EVENTS] = events
    if catalog is not None:
        tables[paths.ITEM_FEATURES] = item_feature_table(items["item_id"], catalog)
    tables[paths.USER_STATS], tables[paths.ITEM_STATS] = u_stats, i_stats
    for artifact, table in tables.items():
        ctx.write(artifact, codecs.parquet_bytes(table))
    n_u, n_i = len(users), len(items)
    result = {
        "users": n_u,
        "items": n_i,
        "items_without_events": int((items["n_events"] == 0).sum()),
        "events": counts["events"],
        "excluded_users": int(n_excluded),
        "train_events": counts["train_events"],
        "holdout_events": counts["holdout_events"],
        "holdout_users": counts["holdout_users"],
        "relevant_pairs": counts["relevant_pairs"],
        "density": round(counts["events"] / (n_u * n_i), 6),
        "engine": ctx.config.data.engine,
    }
    log.info(
        "features (%s): %d users, %d items, %d train / %d holdout events, %d users evaluated",
        result["engine"],
        n_u,
        n_i,
        result["train_events"],
        result["holdout_events"],
        result["holdout_users"],
    )
    return ctx.write_result(STAGE, result)


def _indexed_events(events: pd.DataFrame) -> pd.DataFrame:
    """feature_tables on the integer indices (no string-keyed groupbys over every event)."""
    return events[["user_idx", "item_idx", "timestamp", "rating"]].rename(
        columns={"user_idx": "user_id", "item_idx": "item_id"}
    )


def _indexed_catalog(items: pd.DataFrame, catalog: pd.DataFrame | None) -> pd.DataFrame | None:
    """The catalog keyed by item index (its item_id column holds the index), for the statistics."""
    if catalog is None:
        return None
    idx = pd.Series(items["item_idx"].to_numpy(), index=items["item_id"].astype(str).to_numpy())
    cat = catalog.assign(item_id=catalog["item_id"].astype(str).map(idx)).dropna(subset=["item_id"])
    cat["item_id"] = cat["item_id"].astype(np.int64)
    return cat
