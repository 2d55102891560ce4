"""refresh against the real Redis server on this machine (unique key prefix per test)."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

from pipeline.context import RunContext
from pipeline.release import format as release
from pipeline.release import refresh
from pipeline.serving.app import create_app
from pipeline.serving.user_store import RedisStore, key
from pipeline.stages import run_all
from pipeline.storage.redis import redis_client
from tests.conftest import REDIS_URL

pytestmark = pytest.mark.integration


@pytest.fixture
def redis_ctx(ctx, redis_prefix):
    settings = ctx.settings.model_copy(
        update={"redis_url": REDIS_URL, "redis_prefix": redis_prefix, "redis_grace_seconds": 120}
    )
    return RunContext(config=ctx.config, interval_end=ctx.interval_end, settings=settings)


def test_refresh_writes_versioned_keys_then_flips(redis_ctx, redis_prefix):
    results = run_all(redis_ctx)
    rid = results["publish"]["release_id"]
    out = results["refresh"]
    assert out["store"] == "redis" and out["flipped"] and out["previous_release_id"] is None
    r = redis_client(REDIS_URL)
    assert r.get(key(redis_prefix, "acme", "current")) == rid.encode()
    rel = release.load_release(redis_ctx.store, "acme", rid)
    for row in (0, 7, len(rel.user_ids) - 1):
        user = rel.user_ids[row]
        vec = np.frombuffer(r.get(key(redis_prefix, "acme", rid, "u", user)), dtype=np.float32)
        assert np.array_equal(vec, rel.user_vectors[row])
        seen = np.frombuffer(r.get(key(redis_prefix, "acme", rid, "seen", user)), dtype=np.int32)
        assert np.array_equal(seen, rel.seen(row))
        # the online feature subset: float32 in the order meta names, equal to the offline table
        online = np.frombuffer(r.get(key(redis_prefix, "acme", rid, "uf", user)), dtype=np.float32)
        names = r.hget(key(redis_prefix, "acme", rid, "meta"), "user_features").decode().split(",")
        offline = rel.user_stats.set_index("user_id").loc[user, names].to_numpy(dtype=np.float32)
        np.testing.assert_array_equal(online, offline)
    assert np.array_equal(np.frombuffer(r.get(key(redis_prefix, "acme", rid, "popular")), np.int32), rel.popular)
    # rerun: same keys, nothing flips
    again = refresh.refresh(redis_ctx)
    assert not again["flipped"] and again["release_id"] == rid


def test_flip_expires_previous_release_and_refuses_incomplete(redis_ctx, redis_prefix):
    run_all(redis_ctx)
    rid = release.read_pointer(redis_ctx.store, "acme")[0]["release_id"]
    r = redis_client(REDIS_URL)
    with pytest.raises(RuntimeError, match="incomplete"):
        refresh.flip(r, redis_prefix, "acme", "half-written", 60)
    assert r.get(key(redis_prefix, "acme", "current")) == rid.encode()
    r.hset(key(redis_prefix, "acme", "newer", "meta"), "complete", 1)
    flipped, previous = refresh.flip(r, redis_prefix, "acme", "newer", 60)
    assert flipped and previous == rid
    ttl = r.ttl(key(redis_prefix, "acme", rid, "popular"))
    assert 0 < ttl <= 60  # the replaced release lingers for the grace period, then expires


def test_refresh_killed_halfway_leaves_old_release_live(ctx, redis_ctx, redis_prefix, monkeypatch):
    run_all(ctx)  # published, but nothing in Redis yet
    rid = release.read_pointer(ctx.store, "acme")[0]["release_id"]
    r = redis_client(REDIS_URL)
    r.set(key(redis_prefix, "acme", "current"), b"old-release")
    real_pipeline, calls = r.pipeline, []

    def dying_pipeline(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise ConnectionError("killed mid-refresh")
        return real_pipeline(*args, **kwargs)

    monkeypatch.setattr(r, "pipeline", dying_pipeline)
    monkeypatch.setattr(refresh, "BATCH", 50)
    monkeypatch.setattr(refresh, "redis_client", lambda url: r)
    with pytest.raises(refresh.RefreshFailed, match="previous release stays live"):
        refresh.refresh(redis_ctx)
    assert r.get(key(redis_prefix, "acme", "current")) == b"old-release"
    assert r.hget(key(redis_prefix, "acme", rid, "meta"), "complete") is None
    assert r.exists(key(redis_prefix, "acme", rid, "u", release.load_release(ctx.store, "acme", rid).user_ids[0]))
    monkeypatch.undo()
    done = refresh.refresh(redis_ctx)  # the rerun finishes the job
    assert done["flipped"] and done["previous_release_id"] == "old-release"
    assert r.get(key(redis_prefix, "acme", "current")) == rid.encode()


def test_serving_reads_user_vectors_from_redis(redis_ctx, redis_prefix):
    run_all(redis_ctx)
    rid = release.read_pointer(redis_ctx.store, "acme")[0]["release_id"]
    rel = release.load_release(redis_ctx.store, "acme", rid)
    user = rel.user_ids[5]
    # change the vector in Redis only: serving must use it (proves the Redis path is live)
    r = redis_client(REDIS_URL)
    target = rel.item_vectors[int(np.argmin(rel.item_popularity))]
    r.set(key(redis_prefix, "acme", rid, "u", user), (target * 100).astype(np.float32).tobytes())
    r.set(key(redis_prefix, "acme", rid, "seen", user), b"")
    with TestClient(create_app(redis_ctx.settings)) as client:
        body = client.get(f"/v1/tenants/acme/users/{user}/recommendations", params={"k": 3}).json()
        assert body["release_id"] == rid and not body["fallback"]
        assert isinstance(client.app.state.releases.get("acme").users, RedisStore)
        expected = rel.item_ids[int(np.argmax(rel.item_vectors @ (target * 100)))]
        assert body["items"][0]["item_id"] == expected
