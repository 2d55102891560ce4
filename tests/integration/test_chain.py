"""The whole chain in process, then the API over what it published (FastAPI TestClient)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from fastapi.testclient import TestClient

from pipeline.cli import EXIT_FAILED, EXIT_OK, EXIT_REJECTED, EXIT_USAGE, main
from pipeline.context import RunContext
from pipeline.release import format as release
from pipeline.serving.app import create_app
from pipeline.stages import STAGES, GateRejected, run_all
from pipeline.storage import codecs, paths
from tests.conftest import INTERVAL_END, write_tenant

pytestmark = pytest.mark.integration


def test_chain_publishes_a_verified_release(published):
    ctx, results = published
    assert list(results) == list(STAGES)
    ev = results["evaluate"]["metrics"]
    assert ev["als"]["ndcg@10"] > ev["popularity"]["ndcg@10"]
    assert results["gate"]["publish"]
    rid = results["publish"]["release_id"]
    assert rid.startswith(ctx.run_id) and results["publish"]["pointer_moved"]
    pointer, _ = release.read_pointer(ctx.store, ctx.tenant)
    assert pointer["release_id"] == rid
    manifest = release.read_manifest(ctx.store, ctx.tenant, rid)
    assert set(release.FILES) <= set(manifest["files"]) <= set(release.FILES) | set(release.OPTIONAL_FILES)
    assert {"user_stats.parquet", "item_stats.parquet"} <= set(manifest["files"])
    assert manifest["metrics"]["als"]["ndcg@10"] == ev["als"]["ndcg@10"]
    assert manifest["data_interval_end"] == INTERVAL_END.isoformat()
    # the published model learned from ALL events (refit), not just the train split
    assert results["refit"]["events"] == results["features"]["events"] > results["train"]["events"]
    rel = release.load_release(ctx.store, ctx.tenant, rid)
    assert rel.user_vectors.dtype == np.float32 and rel.user_vectors.shape[0] == results["features"]["users"]
    # nothing pickled: every .npy loads with allow_pickle=False
    for name in manifest["files"]:
        if name.endswith(".npy"):
            codecs.read_npy(ctx.store.get(paths.release_key(ctx.tenant, rid, name)))


def test_mlflow_has_params_loss_curve_and_metrics(published):
    import mlflow

    ctx, results = published
    mlflow.set_tracking_uri(ctx.settings.mlflow_tracking_uri)
    client = mlflow.MlflowClient()
    run = client.get_run(results["train"]["mlflow_run_id"])
    assert run.data.params["factors"] == str(ctx.config.model.factors)
    assert run.data.tags["recsys.tenant"] == "acme" and run.data.tags["recsys.gate"] == "publish"
    curve = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in curve] == list(range(1, ctx.config.model.iterations + 1))
    assert run.data.metrics["als.ndcg_at_10"] == pytest.approx(results["evaluate"]["metrics"]["als"]["ndcg@10"])
    assert run.data.metrics["popularity.ndcg_at_10"] < run.data.metrics["als.ndcg_at_10"]


def test_rerun_is_idempotent(published):
    ctx, first = published
    blob = ctx.store.get(ctx.key(paths.EVENTS))
    again = run_all(ctx)
    assert again["publish"]["release_id"] == first["publish"]["release_id"]
    assert not again["publish"]["written"] and not again["publish"]["pointer_moved"]
    assert ctx.store.get(ctx.key(paths.EVENTS)) == blob


def test_tampered_release_is_refused(published):
    ctx, results = published
    rid = results["publish"]["release_id"]
    key = paths.release_key(ctx.tenant, rid, "item_vectors.npy")
    data = bytearray(ctx.store.get(key))
    data[-1] ^= 0xFF
    ctx.store.put(key, bytes(data))
    with pytest.raises(release.ReleaseError, match="checksum mismatch on item_vectors.npy"):
        release.load_release(ctx.store, ctx.tenant, rid)


def test_api_serves_the_release(published):
    ctx, results = published
    rid = results["publish"]["release_id"]
    rel = release.load_release(ctx.store, ctx.tenant, rid)
    user = rel.user_ids[3]
    seen = set(rel.item_ids[rel.seen(3)])
    settings = ctx.settings.model_copy(update={"admin_token": "admin"})
    with TestClient(create_app(settings)) as client:
        r = client.get(f"/v1/tenants/acme/users/{user}/recommendations", params={"k": 10})
        assert r.status_code == 200
        body = r.json()
        assert body["release_id"] == rid and body["tenant"] == "acme" and body["fallback"] is False
        items = [i["item_id"] for i in body["items"]]
        assert len(items) == 10 and not seen & set(items)
        scores = [i["score"] for i in body["items"]]
        assert scores == sorted(scores, reverse=True)
        assert len(body["recommendation_id"]) == 32
        cold = client.get("/v1/tenants/acme/users/never-seen/recommendations", params={"k": 5}).json()
        assert cold["fallback"] is True and cold["fallback_reason"] == "unknown_user"
        assert [i["item_id"] for i in cold["items"]] == list(rel.item_ids[rel.popular[:5]])
        sim = client.get(f"/v1/tenants/acme/items/{rel.item_ids[0]}/similar", params={"k": 5}).json()
        assert len(sim["items"]) == 5 and rel.item_ids[0] not in [i["item_id"] for i in sim["items"]]
        assert client.get("/v1/tenants/nobody/users/x/recommendations").status_code == 404
        assert client.get(f"/v1/tenants/acme/items/{'no-such-item'}/similar").status_code == 404
        for bad in ("Acme", "a" * 41, "-x", "a_b", "%2A"):
            assert client.get(f"/v1/tenants/{bad}/users/x/recommendations").status_code == 422, bad
        for k in (0, 101, -1, "ten"):
            assert client.get(f"/v1/tenants/acme/users/{user}/recommendations", params={"k": k}).status_code == 422
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/readyz").json() == {"status": "ok", "loaded": 0, "expected": 0, "tenants": None}
        admin = {"Authorization": "Bearer admin"}
        assert client.get("/readyz", headers=admin).json()["tenants"] == {"acme": rid}
        assert client.get("/metrics").status_code == 401
        assert "recsys_request_seconds" in client.get("/metrics", headers=admin).text


def test_api_keys_when_auth_enabled(published, tmp_path):
    ctx, _ = published
    from pipeline.serving.auth import hash_key

    keys = tmp_path / "keys.yaml"
    keys.write_text(f"acme: [{hash_key('acme-secret')}]\nother: [{hash_key('other-secret')}]\n")
    settings = ctx.settings.model_copy(update={"auth_disabled": False, "api_keys_file": keys})
    with TestClient(create_app(settings)) as client:
        url = "/v1/tenants/acme/users/x/recommendations"
        assert client.get(url).status_code == 401
        assert client.get(url, headers={"X-API-Key": "other-secret"}).status_code == 403
        assert client.get(url, headers={"X-API-Key": "acme-secret"}).status_code == 200


def test_gate_rejects_a_worse_model_and_keeps_the_live_release(published, settings, small_df):
    ctx, results = published
    live = results["publish"]["release_id"]
    later = small_df.copy()
    later["timestamp"] = later["timestamp"] + 0  # same events; a much worse model config
    cfg = write_tenant(settings, "acme", later, model={"factors": 1, "iterations": 1, "regularization": 500.0})
    bad = RunContext(config=cfg, interval_end=INTERVAL_END + timedelta(days=1), settings=settings)
    with pytest.raises(GateRejected) as err:
        run_all(bad)
    assert "rejected" in str(err.value)
    decision = codecs.read_json(bad.store.get(bad.key(paths.DECISION)))
    assert decision["publish"] is False and decision["checks"]
    assert release.read_pointer(bad.store, "acme")[0]["release_id"] == live
    assert bad.read_result("publish") is None


def test_cli_exit_codes(settings, small_df, monkeypatch, capsys):
    for name, value in {
        "RECSYS_HOME": str(settings.home),
        "RECSYS_ARTIFACT_ROOT": settings.artifact_root,
        "RECSYS_TENANTS_DIR": str(settings.tenants_dir),
        "MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri,
        "RECSYS_DATA_ROOT": str(settings.data_root),
    }.items():
        monkeypatch.setenv(name, value)
    from pipeline.config import get_settings

    get_settings.cache_clear()
    try:
        write_tenant(settings, "acme", small_df)
        end = "2025-04-01T00:00:00+00:00"
        assert main(["run", "acme", "--interval-end", end]) == EXIT_OK
        assert "release:" in capsys.readouterr().out
        bad_model = write_tenant(
            settings, "worse", small_df, model={"factors": 1, "iterations": 1, "regularization": 500.0}
        )
        assert bad_model.tenant == "worse"
        assert main(["run", "worse", "--interval-end", end]) == EXIT_REJECTED
        (settings.tenants_dir / "broken.yaml").write_text("tenant: broken\nsource: {}\n")
        assert main(["run", "broken"]) == EXIT_USAGE
        assert "field 'source.uri'" in capsys.readouterr().err
        write_tenant(settings, "empty", small_df.head(0))
        assert main(["run", "empty", "--interval-end", end]) == EXIT_FAILED
        assert main(["run", "--tenant-file", str(settings.tenants_dir / "acme.yaml"), "--interval-end", end]) == EXIT_OK
    finally:
        get_settings.cache_clear()


def test_pointer_never_moves_backwards(published, settings, small_df):
    ctx, results = published
    older = RunContext(config=ctx.config, interval_end=datetime(2025, 3, 15, tzinfo=UTC), settings=settings)
    out = run_all(older)
    assert out["publish"]["written"] and not out["publish"]["pointer_moved"]
    assert "not moved backwards" in out["publish"]["pointer_reason"]
    assert release.read_pointer(ctx.store, "acme")[0]["release_id"] == results["publish"]["release_id"]
