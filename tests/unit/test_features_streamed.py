"""The out-of-core features path (data.engine: duckdb) writes the same tables as the in-memory one."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.context import RunContext, StageError
from pipeline.data import extract
from pipeline.features import stage as features
from pipeline.samples import synthetic
from pipeline.storage import codecs, paths
from tests.conftest import write_tenant

END = datetime(2025, 4, 1, tzinfo=UTC)
TABLES = (paths.USERS, paths.ITEMS, paths.EVENTS, paths.USER_STATS, paths.ITEM_STATS, paths.ITEM_FEATURES)


def _tricky(seed: int = 3) -> pd.DataFrame:
    """A long-tailed tenant plus what sorts and ranks trip on: rows equal in (user, time, item)
    with different ratings, equal timestamps, missing ratings, ids that sort differently as
    bytes, numbers and case ('u10' < 'u9', 'U1' < 'u1'), and a non-ASCII id."""
    df = synthetic.interactions(n_users=120, n_items=80, mean_events=15, seed=seed, start="2025-01-01", days=90)
    rng = np.random.default_rng(seed)
    dup = df.sample(60, random_state=seed).assign(rating=lambda d: d["rating"] % 5 + 1)
    same_time = df.sample(80, random_state=seed + 1).assign(timestamp=int(df["timestamp"].iloc[0]))
    odd = pd.DataFrame(
        {
            "user_id": ["U1", "u1", "ü7", "u10"] * 5,
            "item_id": ["i1", "I1", "i10", "é2"] * 5,
            "timestamp": int(df["timestamp"].iloc[-1]) - np.arange(20) * 3600,
            "rating": 3.0,
        }
    )
    out = pd.concat([df, dup, same_time, odd], ignore_index=True)
    out.loc[rng.random(len(out)) < 0.05, "rating"] = np.nan
    return out.sample(frac=1.0, random_state=seed).reset_index(drop=True)  # source order is arbitrary


def _run(settings, tmp_path, engine: str, df: pd.DataFrame, excluded: list[str]) -> RunContext:
    s = settings.model_copy(update={"artifact_root": str(tmp_path / engine)})
    items = sorted(df["item_id"].unique())
    catalog = pd.DataFrame(
        {
            "item_id": [*items, "zz-new"],
            "category": [f"c{n % 4}" for n in range(len(items))] + ["c9"],
            "tags": ["x|y"] * len(items) + ["z"],
            "title": [f"Item {n}" for n in range(len(items) + 1)],
        }
    ).drop(index=[3, 5])  # two items with events are missing from the catalog
    path = tmp_path / f"catalog-{engine}.csv"
    catalog.to_csv(path, index=False)
    cols = {"item_id": "item_id", "category": "category", "tags": "tags", "title": "title"}
    cfg = write_tenant(s, "acme", df, catalog={"uri": str(path), "columns": cols}, data={"engine": engine})
    ctx = RunContext(config=cfg, interval_end=END, settings=s)
    extract.extract(ctx)
    ctx.write(paths.EXCLUDED_USERS, codecs.parquet_bytes(pd.DataFrame({"user_id": pd.array(excluded, dtype="string")})))
    return ctx


def test_duckdb_features_equal_pandas_features(settings, tmp_path):
    df = _tricky()
    excluded = ["u5", "u17"]
    ours = {}
    for engine in ("pandas", "duckdb"):
        ctx = _run(settings, tmp_path, engine, df, excluded)
        result = features.features(ctx)
        ours[engine] = (result, {t: pq.read_table(pa.BufferReader(ctx.read(t))) for t in TABLES})
    (rp, tp), (rd, td) = ours["pandas"], ours["duckdb"]
    assert rp.pop("engine") == "pandas" and rd.pop("engine") == "duckdb"
    assert rp == rd and rp["excluded_users"] == 2 and rp["holdout_users"] > 50 and rp["items_without_events"] == 1
    for t in TABLES:
        if t == paths.ITEM_FEATURES:  # list columns: compared as Arrow (pandas cannot read them back)
            assert td[t].replace_schema_metadata().equals(tp[t].replace_schema_metadata())
        else:
            pd.testing.assert_frame_equal(td[t].to_pandas(), tp[t].to_pandas(), check_exact=True, obj=str(t))
    ev = tp[paths.EVENTS]
    assert len(ev) == len(df.dropna(subset=["timestamp"])) - df["user_id"].isin(excluded).sum()


def test_duckdb_features_refuse_too_few_users(settings, tmp_path):
    df = pd.DataFrame(
        {
            "user_id": ["a", "b"] * 60,
            "item_id": [f"i{i}" for i in range(120)],
            "timestamp": np.arange(120) + 1_700_000_000,
            "rating": 1.0,
        }
    )
    s = settings.model_copy(update={"artifact_root": str(tmp_path / "a")})
    cfg = write_tenant(s, "acme", df, data={"engine": "duckdb"})
    ctx = RunContext(config=cfg, interval_end=datetime(2026, 1, 1, tzinfo=UTC), settings=s)
    extract.extract(ctx)
    ctx.write(paths.EXCLUDED_USERS, codecs.parquet_bytes(pd.DataFrame({"user_id": pd.array([], dtype="string")})))
    with pytest.raises(StageError, match=r"too few to train: 2 users \(features.min_users=10\)"):
        features.features(ctx)
