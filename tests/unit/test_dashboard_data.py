"""The dashboard's figures, from hand-made store contents: release diff, run status, fleet order."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pytest

from pipeline.config import TenantConfig
from pipeline.ops import fleet
from pipeline.ops.release_diff import release_diff
from pipeline.release import format as release
from pipeline.storage import LocalStore, codecs, paths


def _release(store, tenant, rid, users, items, top, model="als"):
    files = {
        "users.parquet": codecs.parquet_bytes(pd.DataFrame({"user_id": users})),
        "items.parquet": codecs.parquet_bytes(pd.DataFrame({"item_id": items})),
        "candidates.npy": codecs.npy_bytes(np.array(top, dtype=np.int32)),
    }
    for name, data in files.items():
        store.put(paths.release_key(tenant, rid, name), data)
    manifest = {"model": model, "files": {n: {"sha256": release.sha256(d)} for n, d in files.items()}}
    store.put(paths.release_key(tenant, rid, release.MANIFEST), codecs.json_bytes(manifest))


def test_release_diff_matches_users_and_items_by_id(tmp_path):
    store = LocalStore(tmp_path)
    # A: u1 -> a b, u2 -> c (padded). B numbers users and items differently: u1 -> a e, u2 -> b a, u3 -> e b
    _release(store, "t", "A", ["u1", "u2"], ["a", "b", "c", "d"], [[0, 1], [2, -1]])
    _release(store, "t", "B", ["u2", "u3", "u1"], ["b", "a", "e"], [[0, 1], [2, 0], [1, 2]])
    d = release_diff(store, "t", "A", "B", k=2)
    assert d["available"] and d["shared_users"] == 2 and d["new_users"] == 1 and d["dropped_users"] == 0
    assert d["mean_overlap"] == pytest.approx(0.25)  # u1 keeps a (1/2), u2 keeps nothing (0/2)
    assert d["unchanged_lists"] == 0
    assert d["coverage"] == {"old": 0.75, "new": 1.0}  # a b c of 4; b a e of 3
    assert d["catalog"] == {"old": 4, "new": 3, "added": 1, "removed": 2}
    assert d["entered"] == {"count": 1, "top": [{"item_id": "e", "users": 2}]}
    assert d["left"] == {"count": 1, "top": [{"item_id": "c", "users": 1}]}
    assert d["overlap_histogram"]["users"] == [1, 0, 1, 0, 0]  # 0 and 0.5
    assert release_diff(store, "t", "A", "A", k=2)["mean_overlap"] == 1.0


def test_release_diff_without_candidate_lists_says_why(tmp_path):
    store = LocalStore(tmp_path)
    _release(store, "t", "A", ["u1"], ["a"], [[0]])
    store.put(paths.release_key("t", "S", release.MANIFEST), codecs.json_bytes({"model": "ease", "files": {}}))
    d = release_diff(store, "t", "A", "S")
    assert d["available"] is False and "candidates.npy" in d["reason"] and "ease" in d["reason"]


NOW = datetime(2026, 1, 10, 12, tzinfo=UTC)


def _run(store, tenant, run_id, stages, gate_publish=True, cost=None, newest="2026-01-10T00:00:00+00:00"):
    for s in stages:
        result = {"cost": cost} if cost else {}
        if s == "extract":
            result |= {"rows": 100, "max_timestamp": newest}
        if s == "validate":
            result |= {"success": True, "warnings": 2, "failed": 0, "interval_events": 40}
        if s == "gate":
            result |= {"publish": gate_publish, "reason": "why"}
            store.put(paths.DECISION.key(tenant, run_id), codecs.json_bytes(result))
        store.put(paths.result(s).key(tenant, run_id), codecs.json_bytes(result))


def _live(store, tenant, end="2026-01-10T00:00:00+00:00"):
    store.put(paths.pointer_key(tenant), codecs.json_bytes({"release_id": "R", "data_interval_end": end}))


def _cfg(t):
    return TenantConfig.model_validate({"tenant": t, "source": {"uri": "x.csv"}})


def test_run_status_cost_and_fleet_order(tmp_path):
    store = LocalStore(tmp_path)
    every = list(fleet.STAGES)
    cost = {"cpu_s": 1.5, "wall_s": 2.0, "peak_rss_mb": 300.0}
    _run(store, "good", "20260110T000000Z", every, cost=cost)
    _live(store, "good")
    _run(store, "broke", "20260110T000000Z", every[:4])  # died in train
    _live(store, "broke")
    _run(store, "nope", "20260110T000000Z", every[: every.index("gate") + 1], gate_publish=False)
    _live(store, "nope")
    _run(store, "old", "20260101T000000Z", every, newest="2026-01-01T00:00:00+00:00")
    _live(store, "old", end="2026-01-01T00:00:00+00:00")

    rows = {t: fleet.fleet_row(store, _cfg(t), NOW) for t in ("good", "broke", "nope", "old")}
    good = rows["good"]
    assert good["status"] == "published" and good["health"] == "warning"  # 2 validation warnings
    assert good["freshness_hours"] == pytest.approx(12.0) and good["live_age_hours"] == pytest.approx(12.0)
    assert good["cost"] == {"cpu_s": 1.5 * len(every), "wall_s": 2.0 * len(every), "peak_rss_mb": 300.0}
    assert rows["broke"]["status"] == "failed" and rows["broke"]["last_run"]["stopped_at"] == "train"
    assert rows["nope"]["status"] == "rejected" and rows["nope"]["gate"]["publish"] is False
    assert rows["old"]["health"] == "stale" and rows["old"]["freshness_hours"] == pytest.approx(9.5 * 24)
    assert [r["tenant"] for r in fleet.fleet(list(rows.values()))] == ["broke", "old", "good", "nope"]
    # Airflow's own state of the latest run wins when it says failed
    assert fleet.fleet_row(store, _cfg("good"), NOW, {"state": "failed", "run_id": "m"})["health"] == "failed"
    assert fleet.fleet_row(store, _cfg("good"), NOW, {"state": "running", "run_id": "m"})["status"] == "running"
    assert fleet.fleet_row(store, _cfg("never"), NOW)["status"] == "never run"
