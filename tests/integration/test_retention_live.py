"""Retention beside work in progress: what a running run needs and what any store serves stays."""

from __future__ import annotations

from datetime import timedelta

import pytest

from pipeline.context import RunContext
from pipeline.ops import maintenance
from pipeline.release import format as release
from pipeline.stages import STAGES, run_all, run_stage
from pipeline.storage import codecs, paths
from pipeline.storage import lease as leases
from pipeline.storage.lease import Holder
from pipeline.storage.redis import key, redis_client
from tests.conftest import INTERVAL_END, REDIS_URL, write_tenant
from tests.integration.fast_tenant import GATE_OPEN

pytestmark = pytest.mark.integration


def test_maintenance_during_a_running_backfill_keeps_what_it_needs(settings, small_df, redis_prefix):
    settings = settings.model_copy(update={"redis_url": REDIS_URL, "redis_prefix": redis_prefix})
    cfg = write_tenant(
        settings,
        "acme",
        small_df,
        model={"factors": 4, "iterations": 2},
        gate=GATE_OPEN,
        retention={"runs": 1, "releases": 2},
    )
    day = lambda d: RunContext(  # noqa: E731
        config=cfg, interval_end=INTERVAL_END + timedelta(days=d), settings=settings
    )
    ids = [run_all(day(d))["publish"]["release_id"] for d in range(3)]
    r = redis_client(REDIS_URL)
    t = "acme"

    # a backfill of an old interval is between its index and publish tasks: it holds the lease
    backfill = RunContext(
        config=cfg,
        interval_end=INTERVAL_END - timedelta(days=20),
        settings=settings,
        holder=Holder.airflow("recsys_acme", "backfill__2025-03-12", 1),
    )
    for name in STAGES[: STAGES.index("index") + 1]:
        run_stage(name, backfill)
    old_run = backfill.run_id
    needed = backfill.store.list(paths.run_prefix(t, old_run) + "/")
    # ... and a rerun of another old interval is uploading its release (no manifest yet) under its lease
    uploading = RunContext(
        config=cfg, interval_end=INTERVAL_END - timedelta(days=10), settings=settings, holder=Holder.cli()
    )
    fenced, _ = uploading.take_lease("publish")
    half = f"{uploading.run_id}-0123456789"
    fenced.store.put(paths.release_key(t, half, "users.parquet"), b"being uploaded")
    fenced.store.put(paths.release_key(t, half, "item_vectors.npy"), b"being uploaded")
    r.set(key(redis_prefix, t, half, "u", "u1"), b"x")  # its refresh is writing, meta not there yet
    # a refresh that never completed (its run is over): keys without meta, no TTL
    abandoned = "20250201T000000Z-aaaaaaaaaa"
    r.set(key(redis_prefix, t, abandoned, "u", "u1"), b"x")
    r.set(key(redis_prefix, t, abandoned, "seen", "u1"), b"x")
    # a failed publish long ago, its run not running: may go
    backfill.store.put(paths.release_key(t, "20250101T000000Z-ffffffffff", "users.parquet"), b"partial")
    # the tenant is pinned to its first release (rollback); Redis still serves the second
    backfill.store.put(paths.pin_key(t), codecs.json_bytes({"release_id": ids[0]}))
    r.set(key(redis_prefix, t, "current"), ids[0])
    r.expire(key(redis_prefix, t, ids[0], "meta"), 30)  # as a refresh's flip leaves the replaced release

    out = maintenance.apply_retention(backfill.store, cfg, r, redis_prefix, grace_seconds=30)

    assert out["runs_in_progress"] == sorted([old_run, uploading.run_id])
    assert backfill.store.list(paths.run_prefix(t, old_run) + "/") == needed  # the backfill's run folder
    assert backfill.store.exists(paths.release_key(t, half, "users.parquet"))  # the upload in progress
    assert not backfill.store.list(paths.release_prefix(t, "20250101T000000Z-ffffffffff") + "/")
    assert set(release.list_releases(backfill.store, t)) == set(ids)  # pinned, Redis's, previous, live
    assert out["live_releases"] == {"pointer": ids[2], "previous": ids[1], "pinned": ids[0], "redis": ids[0]}
    assert r.ttl(key(redis_prefix, t, half, "u", "u1")) == -1  # a running refresh's keys: not expired
    assert 0 < r.ttl(key(redis_prefix, t, abandoned, "u", "u1")) <= 30  # an incomplete, dead refresh
    assert 0 < r.ttl(key(redis_prefix, t, abandoned, "seen", "u1")) <= 30
    assert r.ttl(key(redis_prefix, t, ids[0], "meta")) == -1  # Redis serves it: its TTL is lifted
    assert r.ttl(key(redis_prefix, t, ids[2], "meta")) == -1
    assert 0 < r.ttl(key(redis_prefix, t, ids[1], "meta"))  # the previous one keeps the TTL its refresh gave it
    kept_runs = {paths.run_of_key(t, k) for k in backfill.store.list(paths.runs_prefix(t))}
    assert kept_runs == {old_run, day(2).run_id}

    # the backfill goes on: everything it reads is still there, and it publishes (archived: older)
    for name in STAGES[STAGES.index("index") + 1 :]:
        result = run_stage(name, backfill)
    assert result["release_id"] == ids[2]  # refresh serves the live release, not the archived backfill
    archived = codecs.read_json(backfill.store.get(paths.result("publish").key(t, old_run)))
    assert release.load_release(backfill.store, t, archived["release_id"]).release_id == archived["release_id"]
    assert leases.read(backfill.store, t, old_run)[0]["released"]

    # once the run is over its folder is ordinary history: retention may take it
    again = maintenance.apply_retention(backfill.store, cfg, r, redis_prefix, grace_seconds=30)
    assert old_run not in again["runs_in_progress"]
    assert not backfill.store.list(paths.run_prefix(t, old_run) + "/")
