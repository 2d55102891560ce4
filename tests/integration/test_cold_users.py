"""Cold users (in the tenant's user table, no events yet) get their segment's popular items."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from pipeline.context import RunContext
from pipeline.release import format as release
from pipeline.release import segments
from pipeline.serving.app import create_app
from pipeline.stages import run_all
from pipeline.storage import codecs, open_store
from tests.conftest import INTERVAL_END, isolated_settings, write_tenant

pytestmark = pytest.mark.integration


def test_segment_lists_by_hand():
    # 3 users in segment a (u0-u2), 1 in b (u3, too small at MIN_USERS=2), cold: c0 (a), c1 (b)
    attrs = pd.DataFrame({"user_id": ["u0", "u1", "u2", "u3", "c0", "c1"], "plan": ["a", "a", "a", "b", "a", "b"]})
    user_ids = pd.Series(["u0", "u1", "u2", "u3"])
    users = np.array([0, 0, 1, 1, 2, 3, 3])
    items = np.array([2, 2, 2, 1, 1, 0, 0])  # a: item 2 by u0, u1; item 1 by u1, u2; b: item 0
    old = segments.MIN_USERS
    segments.MIN_USERS = 2
    try:
        files = segments.segment_files(user_ids, users, items, attrs, n_items=3, top=3)
    finally:
        segments.MIN_USERS = old
    popular = codecs.read_npy(files[segments.POPULAR_FILE])
    cold = codecs.read_parquet(files[segments.USERS_FILE])
    assert popular.tolist() == [[1, 2, -1]]  # segment a: items 1 and 2 have 2 users each, ties by index
    assert cold["user_id"].tolist() == ["c0"] and cold["segment"].tolist() == [0]  # c1's segment is too small
    boosted = segments.boosted_popularity(np.array([5.0, 1.0, 0.0]), popular[0])
    assert np.argsort(-boosted).tolist() == [1, 2, 0]


def test_a_cold_user_gets_the_popular_items_of_their_segment(tmp_path, mlflow_uri):
    settings = isolated_settings(tmp_path, mlflow_uri, release_poll_seconds=0, rate_limit="")
    rng = np.random.default_rng(0)
    rows = []
    start = int((INTERVAL_END - pd.Timedelta(days=20)).timestamp())
    for u in range(80):  # pro users favour items i0-i9, free users i10-i19; everyone some of i20-i39
        favourite = 0 if u % 2 == 0 else 10
        for n, item in enumerate(np.r_[rng.choice(10, 6, replace=False) + favourite, rng.choice(20, 4) + 20]):
            rows.append((f"u{u}", f"i{item}", start + u * 3600 + n * 60, 4.0))
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "rating"])
    table = pd.DataFrame({"user_id": [f"u{u}" for u in range(80)] + ["new_pro", "new_free"]})
    table["plan"] = ["pro" if u % 2 == 0 else "free" for u in range(80)] + ["pro", "free"]
    path = tmp_path / "users.csv"
    table.to_csv(path, index=False)
    cfg = write_tenant(settings, "acme", df, users={"uri": str(path)})
    results = run_all(RunContext(config=cfg, interval_end=INTERVAL_END, settings=settings))
    rel = release.load_release(open_store(settings.artifact_root), "acme", results["publish"]["release_id"])
    assert rel.segment_of is not None and set(rel.segment_of.index) == {"new_pro", "new_free"}
    with TestClient(create_app(settings)) as client:
        got = {}
        for user in ("new_pro", "new_free", "stranger"):
            body = client.get(f"/v1/tenants/acme/users/{user}/recommendations?k=5").json()
            got[user] = ([int(i["item_id"][1:]) for i in body["items"]], body["fallback_reason"])
    assert got["new_pro"][1] == got["new_free"][1] == "cold_user_segment"
    assert all(i < 10 for i in got["new_pro"][0]) and all(10 <= i < 20 for i in got["new_free"][0])
    assert got["stranger"][1] == "unknown_user"
