"""Pointers under races (issue 16): one release order for the store and Redis pointers, a
rollback that sticks, verify before flip.

Real services: the local store and S3 (moto's HTTP server), the Redis server on 127.0.0.1
(a unique key prefix, deleted afterwards). Releases are tiny but written, verified and loaded
with the real code. The MLflow registry is replaced by a recorder where a test asserts what
the registry saw and when (test_registry.py runs the real one).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import numpy as np
import pytest

from pipeline.cli import EXIT_OK, main
from pipeline.context import RunContext
from pipeline.data import erased
from pipeline.index import build as faiss_index
from pipeline.index import search as ann
from pipeline.ops import tracking
from pipeline.release import format as rel
from pipeline.release import pointer as ptr
from pipeline.release import redis_pointer, refresh
from pipeline.release.rollback import rollback
from pipeline.stages import run_stage
from pipeline.storage import LocalStore, codecs, paths
from pipeline.storage.redis import key, redis_client
from tests.conftest import INTERVAL_END, REDIS_URL, isolated_settings, write_tenant

pytestmark = pytest.mark.integration
TENANT = "acme"
N_USERS, N_ITEMS, DIM = 6, 8, 4


def day(n: int) -> str:
    return f"2026-02-{n:02d}T00:00:00+00:00"


@cache
def _vectors() -> tuple[np.ndarray, np.ndarray, bytes]:
    rng = np.random.default_rng(0)
    users = rng.standard_normal((N_USERS, DIM)).astype(np.float32)
    items = rng.standard_normal((N_ITEMS, DIM)).astype(np.float32)
    return users, items, ann.serialize(faiss_index.build_index(items)[0])


def tiny_files(seed: int, item_vectors: np.ndarray | None = None) -> dict[str, bytes]:
    """A whole release of 6 users x 8 items; `seed` makes the content (so the id) distinct."""
    users, items, index = _vectors()
    indptr = np.arange(N_USERS + 1, dtype=np.int64)  # one seen item each
    return rel.files_from_vectors(
        [f"u{i}" for i in range(N_USERS)],
        [f"i{j}" for j in range(N_ITEMS)],
        users,
        items if item_vectors is None else item_vectors,
        indptr,
        (np.arange(N_USERS) % N_ITEMS).astype(np.int32),
        index_bytes=index,
        model_meta={"kind": "test", "seed": seed},
        popular_items=5,
    )


def publish(store, seed: int, interval: int, retries: int = 1) -> rel.Published:
    manifest = {"run_id": f"run-{seed}", "data_interval_end": day(interval)}
    return rel.publish_release(store, TENANT, tiny_files(seed), manifest, retries=retries)


def live_doc(store) -> dict:
    got = rel.read_pointer(store, TENANT)
    assert got is not None
    return got[0]


@pytest.fixture
def r(redis_prefix):
    client = redis_client(REDIS_URL)
    yield client
    client.close()


@pytest.fixture
def registry(monkeypatch) -> list[tuple[str, str | None]]:
    """The MLflow registry as a recorder: (release the alias was set to, live pointer at that moment)."""
    calls: list[tuple[str, str | None]] = []

    def register_release(uri, tenant, release_id, source, manifest, run_id, champion):
        got = rel.read_pointer(LocalStore(source.split("/tenants/")[0]), tenant)  # the local store's root
        calls.append((release_id, got[0]["release_id"] if got else None))
        return {"registry": "registered", "model_name": "m", "model_version": "1", "champion_alias": "moved"}

    monkeypatch.setattr(tracking, "register_release", register_release)
    return calls


# --------------------------------------------------------------------------- concurrent publishers


@pytest.mark.parametrize(("store", "n"), [("local", 100), ("s3", 100)], indirect=["store"], ids=["local-100", "s3-100"])
def test_concurrent_publishers_move_both_pointers_monotonically(store, n, r, redis_prefix):
    """100 publishers over 12 intervals in shuffled order, each followed by the refresh's Redis
    step for whatever the store pointer says then. The store pointer's states, ordered by
    generation, have strictly increasing intervals; every Redis flip went from the previous
    flip's order to a higher one; both end on the newest release."""
    intervals = [1 + (i * 7) % 12 for i in range(n)]
    files = {i: tiny_files(i) for i in range(n)}
    flips: list[tuple[int, rel.Flip]] = []
    redis_flips: list[tuple[int, redis_pointer.RedisFlip]] = []
    lock = threading.Lock()

    def publisher(i: int) -> None:
        manifest = {"run_id": f"run-{i}", "data_interval_end": day(intervals[i])}
        # each lost race means another flip moved the pointer forward: 12 intervals bound them
        out = rel.publish_release(store, TENANT, files[i], manifest, retries=12)
        doc = live_doc(store)
        loaded = rel.load_release(store, TENANT, doc["release_id"])
        rflip, _ = refresh.make_live(r, redis_prefix, loaded, doc["generation"], grace_seconds=60)
        with lock:
            flips.append((i, out.flip))
            redis_flips.append((doc["generation"], rflip))

    with ThreadPoolExecutor(max_workers=12) as pool:
        list(pool.map(publisher, range(n)))  # re-raises any publisher's exception

    assert len(flips) == n
    refused = {f.outcome for _, f in flips if not f.moved}
    assert refused <= {rel.FlipOutcome.OLDER_THAN_LIVE, rel.FlipOutcome.SAME_INTERVAL}, refused
    moved = sorted((f.generation, intervals[i], i) for i, f in flips if f.moved)
    assert [g for g, _, _ in moved] == list(range(1, len(moved) + 1))  # one writer per generation
    assert all(a[1] < b[1] for a, b in zip(moved, moved[1:], strict=False)), moved  # never backwards, never sideways
    final = live_doc(store)
    assert final["generation"] == len(moved) and moved[-1][1] == max(intervals)
    assert final["release_id"] == rel.release_id_for(f"run-{moved[-1][2]}", files[moved[-1][2]])

    flipped = sorted((order, f.previous_order) for order, f in redis_flips if f.flipped)
    assert flipped, redis_flips
    assert [prev for _, prev in flipped] == [-1] + [order for order, _ in flipped[:-1]]  # a chain, upwards
    assert redis_pointer.live(r, redis_prefix, TENANT) == (final["release_id"], final["generation"])


# --------------------------------------------------------------------------- stale refresh


def _redis_ctx(tmp_path, prefix: str, small_df) -> RunContext:
    settings = isolated_settings(
        tmp_path, "sqlite:///unused.db", redis_url=REDIS_URL, redis_prefix=prefix, redis_grace_seconds=120
    )
    return RunContext(config=write_tenant(settings, TENANT, small_df), interval_end=INTERVAL_END, settings=settings)


def test_stale_refresh_finishing_after_a_newer_one_leaves_redis_on_the_newer(
    tmp_path, r, redis_prefix, small_df, monkeypatch
):
    ctx = _redis_ctx(tmp_path, redis_prefix, small_df)
    old = publish(ctx.store, 1, 1).release_id
    loaded, go = threading.Event(), threading.Event()
    real_load = rel.load_release

    def slow_load(store, tenant, release_id):
        out = real_load(store, tenant, release_id)
        if release_id == old:  # the stale refresh: it read the pointer before the newer publish
            loaded.set()
            assert go.wait(timeout=30)
        return out

    monkeypatch.setattr(rel, "load_release", slow_load)
    stale: list = []
    t = threading.Thread(target=lambda: stale.append(refresh.refresh(ctx)))
    t.start()
    assert loaded.wait(timeout=30)
    new = publish(ctx.store, 2, 2).release_id
    fresh = refresh.refresh(ctx)
    assert fresh["flipped"] and fresh["release_id"] == new
    go.set()
    t.join(timeout=30)
    assert stale[0]["release_id"] == old and not stale[0]["flipped"] and stale[0]["stale"], stale
    assert redis_pointer.live(r, redis_prefix, TENANT) == (new, live_doc(ctx.store)["generation"])
    # the loser's keys expire; the live release's do not
    assert 0 < r.ttl(key(redis_prefix, TENANT, old, "u", "u1")) <= 120
    assert r.ttl(key(redis_prefix, TENANT, new, "u", "u1")) == -1
    # a refresh that read the old pointer and starts now is refused before writing anything
    r.delete(key(redis_prefix, TENANT, old, "meta"))
    monkeypatch.setattr(rel, "read_pointer", lambda store, tenant: ({"release_id": old, "generation": 1}, "e"))
    again = refresh.refresh(ctx)
    assert again["stale"] and "not written" in again["reason"]
    assert not r.exists(key(redis_prefix, TENANT, old, "meta"))
    assert redis_pointer.live(r, redis_prefix, TENANT)[0] == new


# --------------------------------------------------------------------------- rollback sticks


def test_rollback_pins_blocklists_and_sticks_until_unpin(tmp_path, r, redis_prefix, small_df, registry, cli_env):
    ctx = _redis_ctx(tmp_path, redis_prefix, small_df)
    store, settings = ctx.store, ctx.settings
    good = publish(store, 1, 1).release_id
    refresh.refresh(ctx)
    bad = publish(store, 2, 2).release_id
    assert refresh.refresh(ctx)["flipped"]
    assert r.ttl(key(redis_prefix, TENANT, good, "u", "u1")) > 0  # replaced: expiring
    refresh.write_release(r, redis_prefix, rel.load_release(store, TENANT, good))  # e.g. a stale refresh's writes
    assert r.ttl(key(redis_prefix, TENANT, good, "u", "u1")) > 0  # keep the expiry (SET KEEPTTL)

    # user u2 asks to be forgotten (forget-user: erasure list, their Redis keys deleted)
    erased.add(store, TENANT, "u2")
    for k in r.scan_iter(match=f"{redis_prefix}:{TENANT}:*:u2", count=1000):
        r.delete(k)

    out = rollback(settings, TENANT, reason="bad recommendations", by="test:oncall")
    assert out["moved"] and out["pinned"] and out["release_id"] == good and out["blocklisted"] == bad
    doc = live_doc(store)
    assert doc["release_id"] == good and doc["pinned"]["by"] == "test:oncall"
    pin = codecs.read_json(store.get(paths.pin_key(TENANT)))
    assert pin["release_id"] == good and pin["reason"] == "bad recommendations" and pin["by"] == "test:oncall"
    assert pin["pinned_at_interval_end"] == day(1)
    blocked = codecs.read_json(store.get(paths.blocklist_key(TENANT)))["releases"]
    assert set(blocked) == {bad} and blocked[bad]["rolled_back_to"] == good
    # Redis follows at once, and the rolled-back-to release's expiring keys are kept for good
    assert redis_pointer.live(r, redis_prefix, TENANT) == (good, doc["generation"])
    assert r.ttl(key(redis_prefix, TENANT, good, "u", "u1")) == -1
    assert r.ttl(key(redis_prefix, TENANT, good, "meta")) == -1
    assert not list(r.scan_iter(match=f"{redis_prefix}:{TENANT}:*:u2", count=1000))  # the old release has u2
    assert registry[-1] == (good, good)  # the alias followed the pointer

    # a rerun / retry of the rolled-back interval: written, never live
    rerun = publish(store, 2, 2)
    assert rerun.release_id == bad and not rerun.written and rerun.flip.outcome is rel.FlipOutcome.PINNED
    assert f"pinned at {good} by rollback" in rerun.flip.reason
    newer = publish(store, 3, 3)  # while pinned nothing moves, not even a newer interval
    assert newer.written and newer.flip.outcome is rel.FlipOutcome.PINNED
    assert not refresh.refresh(ctx)["flipped"] and redis_pointer.live(r, redis_prefix, TENANT)[0] == good
    assert live_doc(store)["release_id"] == good

    cli_env(settings)
    assert main(["unpin", TENANT, "--by", "test:oncall"]) == EXIT_OK
    assert not store.exists(paths.pin_key(TENANT)) and "pinned" not in live_doc(store)
    again = publish(store, 2, 2)  # unpinned: the blocklist still keeps the bad release out
    assert again.flip.outcome is rel.FlipOutcome.BLOCKLISTED and live_doc(store)["release_id"] == good
    moved = publish(store, 3, 3)  # a new, newer release moves it
    assert moved.flip.moved and live_doc(store)["release_id"] == newer.release_id
    assert refresh.refresh(ctx)["flipped"] and redis_pointer.live(r, redis_prefix, TENANT)[0] == newer.release_id
    assert r.exists(key(redis_prefix, TENANT, newer.release_id, "u", "u1"))
    assert not r.exists(key(redis_prefix, TENANT, newer.release_id, "u", "u2"))  # erased: refresh skips them too
    assert publish(store, 2, 2).flip.outcome is rel.FlipOutcome.BLOCKLISTED  # the bad one never returns
    # pin by hand, from the CLI: publishes of newer intervals wait
    assert main(["pin", TENANT, "--reason", "freeze for the sale"]) == EXIT_OK
    assert publish(store, 4, 4).flip.outcome is rel.FlipOutcome.PINNED
    assert codecs.read_json(store.get(paths.pin_key(TENANT)))["release_id"] == newer.release_id


def test_a_rollback_killed_after_its_flip_is_finished_by_running_it_again(
    tmp_path, r, redis_prefix, small_df, registry, monkeypatch
):
    ctx = _redis_ctx(tmp_path, redis_prefix, small_df)
    store, settings = ctx.store, ctx.settings
    good = publish(store, 1, 1).release_id
    refresh.refresh(ctx)
    bad = publish(store, 2, 2).release_id
    refresh.refresh(ctx)

    def died(*args, **kwargs):
        raise KeyboardInterrupt("killed between the pointer write and the blocklist")

    with monkeypatch.context() as m:
        m.setattr(ptr, "write_pin_record", died)
        with pytest.raises(KeyboardInterrupt):
            rollback(settings, TENANT, reason="bad recommendations", by="test:oncall")
    doc = live_doc(store)
    assert doc["release_id"] == good and doc["pinned"]  # the pointer moved and pins
    assert not store.exists(paths.blocklist_key(TENANT)) and not store.exists(paths.pin_key(TENANT))
    assert redis_pointer.live(r, redis_prefix, TENANT)[0] == bad  # Redis not reached yet

    out = rollback(settings, TENANT, to=good, by="test:oncall")  # the same command, run again
    assert not out["moved"] and out["pinned"] and out["blocklisted"] == bad
    blocked = codecs.read_json(store.get(paths.blocklist_key(TENANT)))["releases"]
    assert blocked[bad]["rolled_back_to"] == good and blocked[bad]["reason"] == "bad recommendations"
    assert codecs.read_json(store.get(paths.pin_key(TENANT)))["release_id"] == good
    assert redis_pointer.live(r, redis_prefix, TENANT) == (good, doc["generation"])
    assert publish(store, 2, 2).flip.outcome is rel.FlipOutcome.PINNED  # and it sticks
    assert registry[-1] == (good, good)


@pytest.fixture
def cli_env(monkeypatch):
    """Point the CLI's settings (environment) at a test's Settings; cache cleared before and after."""
    from pipeline.config import get_settings

    def use(settings) -> None:
        for name, value in {
            "RECSYS_HOME": str(settings.home),
            "RECSYS_ARTIFACT_ROOT": settings.artifact_root,
            "RECSYS_TENANTS_DIR": str(settings.tenants_dir),
            "RECSYS_DATA_ROOT": str(settings.data_root),
            "MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri,
        }.items():
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("RECSYS_REDIS_URL", raising=False)
        get_settings.cache_clear()

    yield use
    get_settings.cache_clear()


# --------------------------------------------------------------------------- equal intervals


class _Gated:
    """A store whose pointer writes wait at a barrier: every publisher has read the pointer first."""

    def __init__(self, inner, barrier: threading.Barrier) -> None:
        self.inner, self.barrier, self.first = inner, barrier, True

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def put_if(self, k: str, data: bytes, *, etag: str | None) -> None:
        if self.first and k == paths.pointer_key(TENANT):
            self.first = False
            self.barrier.wait(timeout=30)
        self.inner.put_if(k, data, etag=etag)


def test_equal_interval_race_first_flip_wins_and_its_retry_is_a_no_op(store):
    publish(store, 0, 1)
    barrier = threading.Barrier(2)
    results: dict[int, rel.Published] = {}

    def run(seed: int) -> None:
        manifest = {"run_id": f"run-{seed}", "data_interval_end": day(5)}
        results[seed] = rel.publish_release(_Gated(store, barrier), TENANT, tiny_files(seed), manifest, retries=1)

    threads = [threading.Thread(target=run, args=(s,)) for s in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    winners = [s for s, p in results.items() if p.flip.moved]
    assert len(winners) == 1, results
    [loser] = {1, 2} - set(winners)
    # the loser lost the put, and its retry is refused: the same interval is already live
    assert results[loser].flip.outcome is rel.FlipOutcome.SAME_INTERVAL, results[loser].flip
    doc = live_doc(store)
    assert doc["release_id"] == results[winners[0]].release_id and doc["generation"] == 2
    etag = rel.read_pointer(store, TENANT)[1]
    retry = publish(store, winners[0], 5)  # an Airflow retry of the winner: no-op success
    assert retry.flip.outcome is rel.FlipOutcome.ALREADY_LIVE and not retry.written
    assert rel.read_pointer(store, TENANT)[1] == etag  # not even rewritten
    assert publish(store, loser, 5).flip.outcome is rel.FlipOutcome.SAME_INTERVAL
    # the same instant spelled differently is the same interval
    other = rel.publish_release(
        store, TENANT, tiny_files(9), {"run_id": "run-9", "data_interval_end": "2026-02-05T01:00:00+01:00"}
    )
    assert other.flip.outcome is rel.FlipOutcome.SAME_INTERVAL


# --------------------------------------------------------------------------- verify, then flip


class _Corrupting:
    """A store that damages one release file on its way up (a bad disk, a truncated copy)."""

    def __init__(self, inner, name: str) -> None:
        self.inner, self.name = inner, name

    def __getattr__(self, attr):
        return getattr(self.inner, attr)

    def put(self, k: str, data: bytes) -> None:
        if k.startswith(paths.releases_prefix(TENANT)) and k.endswith("/" + self.name):
            data = data[: len(data) // 2] + bytes([data[len(data) // 2] ^ 1]) + data[len(data) // 2 + 1 :]
        self.inner.put(k, data)


@pytest.fixture
def stage_ctx(tmp_path, monkeypatch) -> RunContext:
    """A run whose publish stage is real but whose release is tiny: the upstream artifacts
    publish reads are small stand-ins, and building the files is `tiny_files` (the chain's own
    release is covered by test_chain.py; here only what publish does with it matters)."""
    from pipeline.config import TenantConfig
    from pipeline.release import publish as publish_stage

    settings = isolated_settings(tmp_path, "sqlite:///unused.db")
    cfg = TenantConfig.model_validate({"tenant": TENANT, "source": {"uri": "unused.csv"}})
    ctx = RunContext(config=cfg, interval_end=INTERVAL_END, settings=settings)
    for artifact, doc in (
        (paths.RUN_CONFIG, cfg.model_dump(mode="json")),
        (paths.METRICS, {"metrics": {}}),
        (paths.DECISION, {"publish": True, "reason": "test"}),
        (paths.INDEX_INFO, {"kind": "flat"}),
        (paths.REFITTED.meta, {"kind": "test", "config": {}}),
    ):
        ctx.store.put(ctx.key(artifact), codecs.json_bytes(doc))
    info = {"users": N_USERS, "items": N_ITEMS, "model": "test", "dim": DIM}
    monkeypatch.setattr(publish_stage, "build_files", lambda ctx: (tiny_files(1), dict(info)))
    return ctx


def test_corrupted_upload_is_never_live_nor_registered_and_a_rerun_repairs_it(stage_ctx, registry):
    chain = stage_ctx
    corrupting = _Corrupting(chain.store, "items.faiss")
    bad = RunContext(config=chain.config, interval_end=chain.interval_end, settings=chain.settings, store=corrupting)
    for attempt in range(2):  # the upload, then a retry through the same bad store: never live
        with pytest.raises(rel.ReleaseError) as err:
            run_stage("publish", bad)
        message = str(err.value)
        assert f"release {TENANT}/{chain.run_id}-" in message and "items.faiss" in message, message
        assert "checksum mismatch" in message
        assert rel.read_pointer(chain.store, TENANT) is None and registry == [], attempt
    out = run_stage("publish", chain)  # a rerun on a good store puts the damaged file back
    assert not out["written"] and out["repaired"] == ["items.faiss"] and out["pointer_moved"]
    assert out["verified_files"] == out["files"] and out["smoke_users"] > 0
    assert registry == [(out["release_id"], out["release_id"])]  # the alias followed the pointer, never led


def test_smoke_query_refuses_a_self_consistent_release_with_nan_vectors(tmp_path):
    store = LocalStore(tmp_path)
    good = publish(store, 1, 1).release_id
    items = _vectors()[1].copy()
    items[:, 0] = np.nan  # checksums match; only loading and querying it shows it is useless
    files = tiny_files(2, item_vectors=items)
    with pytest.raises(rel.ReleaseError, match="smoke query: (empty top-10|non-finite scores) for users"):
        rel.publish_release(store, TENANT, files, {"run_id": "run-2", "data_interval_end": day(2)})
    assert live_doc(store)["release_id"] == good
