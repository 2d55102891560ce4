"""API events are stored once and never silently lost; a user's data can be erased on request.

One tenant, its source a CSV of the days before DAY0; API events come through the real app
(TestClient) with its receive clock set by a dependency override, so "when it arrived" is
part of each scenario.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from fastapi.testclient import TestClient

from pipeline.cli import EXIT_FAILED, EXIT_OK, main
from pipeline.config import get_settings
from pipeline.context import RunContext
from pipeline.data import erased, event_log, extract, history
from pipeline.ops import erasure
from pipeline.ops.erasure import ErasureError, forget_user
from pipeline.release import format as release
from pipeline.samples import synthetic
from pipeline.serving.app import create_app, receive_time
from pipeline.stages import run_all
from pipeline.storage import open_store, paths
from pipeline.storage.redis import key, redis_client
from tests.conftest import REDIS_URL, isolated_settings, write_tenant

pytestmark = pytest.mark.integration

DAY0 = datetime(2026, 3, 10, tzinfo=UTC)  # the first published interval ends here


@pytest.fixture
def tenant(tmp_path, mlflow_uri, one_torch_thread):
    settings = isolated_settings(tmp_path, mlflow_uri, release_poll_seconds=0, rate_limit="")
    df = synthetic.interactions(n_users=60, n_items=40, mean_events=14, seed=5, start="2026-03-01", days=9)
    lenient = {"tolerance": 1, "require_beat_popularity": False, "min_coverage_ratio": 0}  # every run publishes
    lenient |= {"max_cold_recall_drop": 1, "max_long_tail_recall_drop": 1}
    cfg = write_tenant(settings, "acme", df, model={"kind": "als", "factors": 8, "iterations": 3}, gate=lenient)
    return settings, cfg


def _ctx(settings, cfg, end: datetime) -> RunContext:
    return RunContext(config=cfg, interval_end=end, settings=settings)


def _post(settings, events: list[dict], at: datetime) -> dict:
    app = create_app(settings)
    app.dependency_overrides[receive_time] = lambda: at
    with TestClient(app) as client:
        r = client.post("/v1/tenants/acme/events", json={"events": events})
    assert r.status_code == 202, r.text
    return r.json()


def test_a_retried_batch_is_stored_once(tenant):
    settings, cfg = tenant
    store = open_store(settings.artifact_root)
    _item_item_release(store)  # a live release to post against (the API folds events into it)
    batch = [{"user_id": "u-new", "item_id": f"i{k}", "event_id": f"e{k}"} for k in range(3)]  # no timestamps
    first = _post(settings, batch, DAY0 + timedelta(hours=5))
    again = _post(settings, batch, DAY0 + timedelta(hours=5, minutes=1))  # the client's retry
    late = _post(settings, batch, DAY0 + timedelta(days=1, hours=1))  # and one after midnight
    assert first["accepted"] == again["accepted"] == late["accepted"] == 3
    assert len(store.list(paths.events_prefix("acme") + "/dt=2026-03-10/")) == 1  # same day: the same object
    logged = event_log.read(store, "acme", DAY0 + timedelta(days=2), start=DAY0)
    assert sorted(logged["item_id"]) == ["i0", "i1", "i2"]  # the next day's retry is dropped at read
    assert (logged["received_at"] == pd.Timestamp(DAY0 + timedelta(hours=5))).all()  # the first one kept
    out = extract.extract(_ctx(settings, cfg, DAY0 + timedelta(days=2)))
    rows = _ctx(settings, cfg, DAY0 + timedelta(days=2)).read_parquet(paths.INTERACTIONS)
    assert out["event_log_rows"] == 3 and (rows["user_id"] == "u-new").sum() == 3
    # without an event id, a timestamped event is keyed on (user, item, type, time); one with neither is not
    stamped = [{"user_id": "u-ts", "item_id": "i1", "timestamp": "2026-03-10T01:00:00Z"}]
    bare = [{"user_id": "u-bare", "item_id": "i1"}]
    for at in (DAY0 + timedelta(hours=6), DAY0 + timedelta(hours=7)):
        _post(settings, stamped + bare, at)
    logged = event_log.read(store, "acme", DAY0 + timedelta(days=1), start=DAY0)
    assert (logged["user_id"] == "u-ts").sum() == 1 and (logged["user_id"] == "u-bare").sum() == 2


def _item_item_release(store) -> None:
    """A hand-made item-item release (no training): 40 items, one user; enough to take events."""
    items = [f"i{k}" for k in range(40)]
    similarity = sp.identity(40, dtype=np.float32, format="csr")
    indptr, indices = np.array([0, 1], dtype=np.int64), np.array([0], dtype=np.int32)
    files = release.files_from_similarity(
        ["u0"], items, similarity, indptr, indices, model_meta={"kind": "item_knn", "config": {}}
    )
    release.publish_release(store, "acme", files, {"run_id": "r0", "data_interval_end": "2026-03-09"})


def test_a_late_event_is_trained_on_next_and_a_rerun_keeps_its_release(tenant):
    settings, cfg = tenant
    first = run_all(_ctx(settings, cfg, DAY0))["publish"]["release_id"]
    # a year-old event arrives after the interval was published: filed under today's arrival day
    old = "2025-03-01T12:00:00Z"
    body = _post(
        settings,
        [{"user_id": "u-late", "item_id": "i3", "timestamp": old, "event_id": "x1"}],
        DAY0 + timedelta(hours=3),
    )
    assert body["accepted"] == 1 and body["rejected"] == []
    again = run_all(_ctx(settings, cfg, DAY0))["publish"]
    assert again["release_id"] == first  # the published interval's data did not change
    nxt = _ctx(settings, cfg, DAY0 + timedelta(days=1))
    result = run_all(nxt)
    rows = nxt.read_parquet(paths.INTERACTIONS)
    late = rows[rows["user_id"] == "u-late"]
    assert result["extract"]["event_log_late_rows"] == 1 and len(late) == 1
    assert late["timestamp"].iloc[0] == pd.Timestamp(old)  # its own time is kept as data
    store = open_store(settings.artifact_root)
    day = history.read(store, [history.partition_key("acme", DAY0.date())])  # the arrival day's partition
    assert (day["user_id"] == "u-late").sum() == 1
    assert "u-late" in set(release.load_release(store, "acme", result["publish"]["release_id"]).user_ids)


def test_forget_user_removes_them_everywhere_and_from_the_next_release(tenant, redis_prefix, monkeypatch, capsys):
    settings, cfg = tenant
    settings = settings.model_copy(update={"redis_url": REDIS_URL, "redis_prefix": redis_prefix})
    ctx = _ctx(settings, cfg, DAY0)
    live = run_all(ctx)["publish"]["release_id"]
    store = open_store(settings.artifact_root)
    rel = release.load_release(store, "acme", live)
    victim, bystander = str(rel.user_ids[0]), str(rel.user_ids[1])
    _post(settings, [{"user_id": victim, "item_id": "i1", "event_id": "v1"}], DAY0 + timedelta(hours=2))
    r = redis_client(REDIS_URL)
    held = [kind for kind in erasure.REDIS_KINDS if r.exists(key(redis_prefix, "acme", live, kind, victim))]
    assert {"u", "seen", "fu", "fseen"} <= set(held)  # refresh and the fold-in wrote them
    r.set(key(redis_prefix, "acme", live, "u", "x" + victim), b"")  # a user whose id merely ends alike

    with pytest.raises(ErasureError, match=r"tenant 'nobody', user 'u1'.*nothing is stored"):
        forget_user(settings, "nobody", "u1", requested_at=DAY0, requested_by="t")
    with pytest.raises(ErasureError, match=r"tenant 'acme', user ' u1'"):
        forget_user(settings, "acme", " u1", requested_at=DAY0, requested_by="t")

    record = forget_user(
        settings, "acme", victim, requested_at=DAY0 + timedelta(hours=4), requested_by="dpo", reason="ticket 7"
    )
    assert record["history"]["rows_removed"] > 0 and record["event_log"]["rows_removed"] == 1
    assert record["redis_keys_deleted"] == len(held) and record["erasure_list"] == "added"
    assert record["still_held_by"]["releases"] == [live] and record["still_held_by"]["runs"]
    audit = store.get(record["audit_key"]).decode()
    assert victim not in audit and json.loads(audit)["user_sha256"] == erased.user_hash(victim)
    assert json.loads(audit)["requested_by"] == "dpo" and json.loads(audit)["reason"] == "ticket 7"
    hist = history.read(store, list(history.partitions(store, "acme").values()))
    assert victim not in set(hist["user_id"]) and bystander in set(hist["user_id"])
    assert victim not in set(event_log.read(store, "acme", DAY0 + timedelta(days=3))["user_id"])
    assert not [k for k in r.scan_iter(match=f"{redis_prefix}:acme:*") if k.decode().endswith(":" + victim)]
    assert r.exists(key(redis_prefix, "acme", live, "u", "x" + victim))
    assert r.exists(key(redis_prefix, "acme", live, "u", bystander))

    nxt = _ctx(settings, cfg, DAY0 + timedelta(days=1))
    result = run_all(nxt)
    users = set(release.load_release(store, "acme", result["publish"]["release_id"]).user_ids)
    assert victim not in users and bystander in users
    assert victim not in set(nxt.read_parquet(paths.INTERACTIONS)["user_id"])
    # again, from the CLI (e.g. after a crash): idempotent, and an audit record of its own
    for name, value in {
        "RECSYS_ARTIFACT_ROOT": settings.artifact_root,
        "RECSYS_REDIS_URL": REDIS_URL,
        "RECSYS_REDIS_PREFIX": redis_prefix,
    }.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    try:
        assert main(["forget-user", "acme", victim, "--reason", "again", "--request-id", "r2"]) == EXIT_OK
        again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert again["erasure_list"] == "already listed" and again["history"]["rows_removed"] == 0
        assert again["request_id"] == "r2" and len(store.list("tenants/acme/erasure/")) == 2
        assert main(["forget-user", "acme", "a b "]) == EXIT_FAILED
        assert "tenant 'acme', user 'a b '" in capsys.readouterr().err
    finally:
        get_settings.cache_clear()
