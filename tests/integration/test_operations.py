"""Operations around releases: export, retention, quality summary, rollback, alerts."""

from __future__ import annotations

import json
import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pytest

from pipeline.context import RunContext
from pipeline.ops import alerts, maintenance
from pipeline.release import export
from pipeline.release import format as release
from pipeline.release.rollback import RollbackError, rollback
from pipeline.stages import run_all
from pipeline.storage import LocalStore, codecs, paths
from pipeline.storage.redis import key, redis_client
from tests.conftest import REDIS_URL

pytestmark = pytest.mark.integration


def test_export_topk_per_user_excludes_seen_and_is_idempotent(published):
    ctx, results = published
    rid = results["publish"]["release_id"]
    out = export.export_topk(ctx.store, ctx.config)
    assert out["release_id"] == rid and out["written"]
    table = codecs.read_parquet(ctx.store.get(paths.export_key("acme", rid)))
    rel = release.load_release(ctx.store, "acme", rid)
    assert table.groupby("user_id").size().max() == ctx.config.export.k
    assert set(table["user_id"]) == set(rel.user_ids)
    first = table[table["user_id"] == rel.user_ids[0]]
    assert first["rank"].tolist() == list(range(1, ctx.config.export.k + 1))
    assert not set(first["item_id"]) & set(rel.item_ids[rel.seen(0)])
    assert np.all(np.diff(first["score"].to_numpy()) <= 1e-6)
    assert export.export_topk(ctx.store, ctx.config, rid)["written"] is False


def _run_days(ctx, days: int) -> list[str]:
    ids = []
    for d in range(days):
        day = RunContext(
            config=ctx.config, interval_end=ctx.interval_end + timedelta(days=d + 1), settings=ctx.settings
        )
        ids.append(run_all(day)["publish"]["release_id"])
    return ids


def test_retention_keeps_newest_runs_and_releases_and_the_live_pair(published, redis_prefix):
    ctx, results = published
    cfg = ctx.config.model_copy(
        update={"retention": ctx.config.retention.model_copy(update={"runs": 2, "releases": 2})}
    )
    ids = [results["publish"]["release_id"], *_run_days(ctx, 3)]
    # a half-written (manifest-less) older release folder: a failed publish
    ctx.store.put(paths.release_key("acme", "19990101T000000Z-deadbeef00", "users.parquet"), b"partial")
    r = redis_client(REDIS_URL)
    for rid in ids:
        r.hset(key(redis_prefix, "acme", rid, "meta"), "complete", 1)
    out = maintenance.apply_retention(ctx.store, cfg, r, redis_prefix, grace_seconds=30)
    assert out["runs_deleted"] == 2 and out["runs_kept"] == 2
    kept = release.list_releases(ctx.store, "acme")
    assert kept == sorted(ids[-2:])
    assert not ctx.store.list(paths.releases_prefix("acme") + "/19990101T000000Z-deadbeef00")
    live = release.read_pointer(ctx.store, "acme")[0]["release_id"]
    assert live == ids[-1]
    assert r.ttl(key(redis_prefix, "acme", live, "meta")) == -1
    assert 0 < r.ttl(key(redis_prefix, "acme", ids[0], "meta")) <= 30
    # idempotent
    again = maintenance.apply_retention(ctx.store, cfg, r, redis_prefix, grace_seconds=30)
    assert again["runs_deleted"] == 0 and again["releases_deleted"] == 0


def test_quality_summary_reports_every_tenant(published):
    ctx, _ = published
    other = ctx.config.model_copy(update={"tenant": "newcomer"})
    out = maintenance.quality_summary(ctx.store, [ctx.config, other], "2025-04-01")
    doc = codecs.read_json(ctx.store.get("reports/data_quality/2025-04-01.json"))
    assert doc["tenants"]["acme"]["status"] == "pass" and doc["tenants"]["acme"]["rows"] > 0
    assert doc["tenants"]["newcomer"]["status"] == "no validation yet"
    assert out["failing"] == []


def test_rollback_moves_pointer_and_redis_back(published, redis_prefix):
    ctx, results = published
    settings = ctx.settings.model_copy(update={"redis_url": REDIS_URL, "redis_prefix": redis_prefix})
    first = results["publish"]["release_id"]
    [second] = _run_days(ctx, 1)
    assert release.read_pointer(ctx.store, "acme")[0]["release_id"] == second
    out = rollback(settings, "acme")
    moved = {k: out[k] for k in ("tenant", "release_id", "previous_release_id", "moved")}
    assert moved == {"tenant": "acme", "release_id": first, "previous_release_id": second, "moved": True}
    assert out["registry"] in ("registered", "already registered")  # the MLflow alias follows (test_registry.py)
    pointer = release.read_pointer(ctx.store, "acme")[0]
    assert pointer["release_id"] == first and pointer["rolled_back_from"] == second
    r = redis_client(REDIS_URL)
    assert r.get(key(redis_prefix, "acme", "current")) == first.encode()
    with pytest.raises(RollbackError, match="nothing published"):
        rollback(settings, "nobody")
    with pytest.raises(release.ReleaseError):
        rollback(settings, "acme", to="20250101T000000Z-0000000000")


def test_rollback_that_loses_a_race_moves_nothing(published, monkeypatch):
    """A publish lands between rollback's read of the pointer and its write: rollback must not
    retry (that would undo the publish); it says so and leaves the new release live."""
    ctx, results = published
    first = results["publish"]["release_id"]
    manifest = release.read_manifest(ctx.store, "acme", first)
    files = {n: release.read_file(ctx.store, "acme", first, n, manifest) for n in manifest["files"]}
    later = {"run_id": "20250402T000000Z", "data_interval_end": "2025-04-02T00:00:00+00:00"}
    second = release.publish_release(ctx.store, "acme", files, later).release_id
    real_put_if = LocalStore.put_if

    def publish_first(self, key, data, *, etag):
        monkeypatch.setattr(LocalStore, "put_if", real_put_if)
        release.flip_pointer(self, "acme", release.Pointer("20250403T000000Z-newer00000", "2025-04-03T00:00:00+00:00"))
        return real_put_if(self, key, data, etag=etag)

    monkeypatch.setattr(LocalStore, "put_if", publish_first)
    with pytest.raises(RollbackError, match="another publisher moved the pointer first.*nothing rolled back"):
        rollback(ctx.settings, "acme", to=first)
    doc = release.read_pointer(ctx.store, "acme")[0]
    assert doc["release_id"] == "20250403T000000Z-newer00000" and doc["previous_release_id"] == second


class _Hook(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self):  # noqa: N802
        self.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def webhook():
    _Hook.received = []
    server = HTTPServer(("127.0.0.1", 0), _Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/hook?token=s3cret-token", _Hook.received
    server.shutdown()


def test_failure_alert_posts_and_never_raises(webhook, caplog):
    url, received = webhook
    assert alerts.notify_failure("acme", "recsys_acme", "run1", "validate", "3 expectations failed", url)
    assert received[0]["tenant"] == "acme" and received[0]["task_id"] == "validate"
    assert "3 expectations failed" in received[0]["text"]
    assert not alerts.notify_failure("acme", "d", "r", "t", "x", "http://127.0.0.1:9/unreachable?token=zzz-secret")
    assert "zzz-secret" not in caplog.text and "s3cret-token" not in caplog.text
