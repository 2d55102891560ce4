"""The features stage out of core (`data.engine: duckdb`): the same tables, computed by DuckDB.

The in-memory path (pipeline/features/stage.py) holds the string-keyed interactions, their
factorized codes and the events table at once: ~40 bytes a row plus the strings, too much at
100M events. Here DuckDB streams the extract's Parquet into a disk-backed session and every
step that needs all rows (distinct ids, the per-user ranks of the temporal holdout, the
sorted events table, the statistics) is a SQL operator that spills past the memory limit.
Only tables of one row per user or item come back into pandas.

Same outputs as the in-memory path, row for row (`tests/unit/test_features_streamed.py`):
* ids are numbered in sorted order (DuckDB compares strings bytewise, which is code-point
  order: Python's);
* ties are broken as pandas' stable sorts break them, by the row's position in the extract
  (`file_row_number`);
* the holdout rule is `temporal_holdout`'s: rank >= n - floor(n * fraction + 1e-9);
* statistics are aggregated here and finished by the same pandas code (`tables.finish_items`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable

import numpy as np
import pandas as pd

from pipeline.data.engine import Session
from pipeline.features.tables import finish_items
from pipeline.storage import paths

_DAY_US = 86_400_000_000.0


@dataclass
class Streamed:
    users: pd.DataFrame  # user_id, user_idx, n_events, n_train, n_holdout
    items: pd.DataFrame  # item_id, item_idx, n_events, n_train
    user_stats: pd.DataFrame  # tables.user_features on indices (user_id = user_idx)
    item_stats: pd.DataFrame  # tables.item_features on indices
    counts: dict[str, int]


def build(
    ctx: Any,
    s: Session,
    excluded: pd.Series,
    catalog_ids: pd.Series | None,
    catalog: pd.DataFrame | None,
    check_sizes: Callable[[int, int], None],
    index_catalog: Callable[[pd.DataFrame, pd.DataFrame | None], pd.DataFrame | None],
) -> Streamed:
    """Number ids, split the holdout, write EVENTS (streamed by DuckDB) and return the rest.

    `catalog_ids`: the catalog's item ids (items without events get an index too);
    `index_catalog(items, catalog)`: the catalog keyed by item index, for the statistics;
    `check_sizes(users, items)` raises before any heavy work when there are too few to train."""
    src = s.stage_in(ctx, paths.INTERACTIONS)
    s.con.register("excluded", pd.DataFrame({"user_id": excluded.astype(str).to_numpy(dtype=object)}))
    s.sql(
        "CREATE TABLE ev AS SELECT user_id, item_id, timestamp AS ts, rating, "
        "COALESCE(weight, 1.0)::DOUBLE AS weight, file_row_number AS rn "
        f"FROM read_parquet({src}, file_row_number = true) "
        "WHERE user_id IS NOT NULL AND item_id IS NOT NULL AND timestamp IS NOT NULL "
        "AND user_id NOT IN (SELECT user_id FROM excluded WHERE user_id IS NOT NULL)"
    )
    s.sql(
        "CREATE TABLE u AS SELECT user_id, (row_number() OVER (ORDER BY user_id) - 1)::INTEGER AS user_idx "
        "FROM (SELECT DISTINCT user_id FROM ev)"
    )
    item_ids = "SELECT DISTINCT item_id FROM ev"
    if catalog_ids is not None:
        s.con.register("catalog_ids", pd.DataFrame({"item_id": catalog_ids.astype(str).to_numpy(dtype=object)}))
        item_ids += " UNION SELECT item_id FROM catalog_ids"
    s.sql(
        "CREATE TABLE i AS SELECT item_id, (row_number() OVER (ORDER BY item_id) - 1)::INTEGER AS item_idx "
        f"FROM ({item_ids})"
    )
    n_u, n_i = (int(x) for x in s.one("SELECT (SELECT count(*) FROM u), (SELECT count(*) FROM i)"))
    n_items_with_events = int(s.one("SELECT count(DISTINCT item_id) FROM ev")[0])
    check_sizes(n_u, n_items_with_events)  # as the in-memory path: items with events, before the catalog
    fraction = float(ctx.config.features.holdout_fraction)
    s.sql(
        "CREATE TABLE e AS SELECT user_idx, item_idx, ts, rating, weight, "
        "(row_number() OVER w - 1) >= n - floor(n * ? + 1e-9) AS holdout, rn FROM ("
        "  SELECT u.user_idx, i.item_idx, ev.ts, ev.rating, ev.weight, ev.rn, "
        "  count(*) OVER (PARTITION BY u.user_idx) AS n"
        "  FROM ev JOIN u USING (user_id) JOIN i USING (item_id)"
        ") WINDOW w AS (PARTITION BY user_idx ORDER BY ts, item_idx, rn)",
        [fraction],
    )
    s.sql("DROP TABLE ev")
    s.copy_out(
        ctx,
        paths.EVENTS,
        'SELECT user_idx, item_idx, ts AS "timestamp", rating, weight, holdout '
        "FROM e ORDER BY user_idx, ts, item_idx, rn",
    )
    users = s.fetch_df(
        "SELECT u.user_id, u.user_idx, count(*) AS n_events, count(*) FILTER (NOT holdout) AS n_train, "
        "count(*) FILTER (holdout) AS n_holdout FROM e JOIN u USING (user_idx) GROUP BY ALL ORDER BY user_idx"
    )
    items = s.fetch_df(
        "SELECT i.item_id, i.item_idx, count(e.item_idx) AS n_events, "
        "count(e.item_idx) FILTER (NOT e.holdout) AS n_train FROM i LEFT JOIN e USING (item_idx) "
        "GROUP BY ALL ORDER BY item_idx"
    )
    rel, rel_users = s.one(
        "SELECT count(*), count(DISTINCT user_idx) FROM "
        "(SELECT DISTINCT user_idx, item_idx FROM e WHERE holdout "
        " EXCEPT SELECT DISTINCT user_idx, item_idx FROM e WHERE NOT holdout)"
    )
    n_events, n_train = (int(x) for x in s.one("SELECT count(*), count(*) FILTER (NOT holdout) FROM e"))
    out_users = pd.DataFrame(
        {
            "user_id": pd.array(users["user_id"], dtype="string"),
            "user_idx": users["user_idx"].to_numpy(np.int32),
            "n_events": users["n_events"].to_numpy(np.int64),
            "n_train": users["n_train"].to_numpy(np.int64),
            "n_holdout": users["n_holdout"].to_numpy(np.int64),
        }
    )
    out_items = pd.DataFrame(
        {
            "item_id": pd.array(items["item_id"], dtype="string"),
            "item_idx": items["item_idx"].to_numpy(np.int32),
            "n_events": items["n_events"].to_numpy(np.int64),
            "n_train": items["n_train"].to_numpy(np.int64),
        }
    )
    u_stats, i_stats = _stats(s, ctx.interval_end, index_catalog(out_items, catalog))
    return Streamed(
        users=out_users,
        items=out_items,
        user_stats=u_stats,
        item_stats=i_stats,
        counts={
            "events": n_events,
            "train_events": n_train,
            "holdout_events": n_events - n_train,
            "holdout_users": int(rel_users),
            "relevant_pairs": int(rel),
        },
    )


def _stats(s: Session, as_of: datetime, cat: pd.DataFrame | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """tables.user_features / item_features on the indices, aggregated by DuckDB."""
    end_us = int(pd.Timestamp(as_of).tz_convert("UTC").value // 1000)
    s.sql(
        f"CREATE TABLE a AS SELECT user_idx, item_idx, rating, (({end_us} - epoch_us(ts))::DOUBLE / {_DAY_US}) AS age "
        "FROM e"
    )
    has_categories = cat is not None and "category" in cat
    if cat is not None and has_categories:
        s.con.register("cat", cat[["item_id", "category"]].rename(columns={"item_id": "item_idx"}))
    users = s.fetch_df(
        "SELECT user_idx, count(*) FILTER (age <= 7) AS events_7d, count(*) FILTER (age <= 30) AS events_30d, "
        "count(*) AS events_total, min(age) AS days_since_last, avg(rating) AS avg_rating "
        "FROM a GROUP BY user_idx ORDER BY user_idx"
    )
    if has_categories:
        distinct = s.fetch_df(
            "SELECT a.user_idx, count(DISTINCT c.category) AS n FROM a LEFT JOIN cat c USING (item_idx) "
            "GROUP BY a.user_idx ORDER BY a.user_idx"
        )
        users["distinct_categories"] = distinct["n"].to_numpy(np.int64)
    else:
        users["distinct_categories"] = np.int64(0)
    u = pd.DataFrame(
        {
            "user_id": users["user_idx"].to_numpy(np.int32),
            "events_7d": users["events_7d"].to_numpy(np.int64),
            "events_30d": users["events_30d"].to_numpy(np.int64),
            "events_total": users["events_total"].to_numpy(np.int64),
            "days_since_last": users["days_since_last"].to_numpy(np.float64),
            "avg_rating": users["avg_rating"].to_numpy(np.float64, na_value=np.nan),
            "distinct_categories": users["distinct_categories"].to_numpy(np.int64),
        }
    )
    items = s.fetch_df(
        "SELECT item_idx, count(DISTINCT user_idx) AS users, count(*) FILTER (age <= 7) AS events_7d, "
        "count(*) FILTER (age <= 30) AS events_30d, max(age) AS age_days FROM a GROUP BY item_idx ORDER BY item_idx"
    )
    i = pd.DataFrame(
        {
            "users": items["users"].to_numpy(np.int64),
            "events_7d": items["events_7d"].to_numpy(np.int64),
            "events_30d": items["events_30d"].to_numpy(np.int64),
            "age_days": items["age_days"].to_numpy(np.float64),
        },
        index=pd.Index(items["item_idx"].to_numpy(np.int32), name="item_id"),
    )
    s.sql("DROP TABLE a")
    return u, finish_items(i, cat)
