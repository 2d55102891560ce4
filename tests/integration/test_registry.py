"""MLflow registry: one model per tenant, one version per live release, alias `champion`.

A real sqlite MLflow under tmp (one per module: migrating a new DB costs seconds) and the real
chain, run for several data intervals.
"""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient

from pipeline.cli import EXIT_OK, main
from pipeline.context import RunContext
from pipeline.ops import tracking
from pipeline.release import format as release
from pipeline.release.rollback import rollback
from pipeline.serving.app import create_app
from pipeline.stages import run_all, run_stage
from pipeline.storage import paths
from tests.conftest import INTERVAL_END, isolated_settings, write_tenant

pytestmark = pytest.mark.integration

UNREACHABLE = "http://127.0.0.1:1"  # nothing listens on port 1


@pytest.fixture(scope="module")
def registry_uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('registry') / 'mlflow.db'}"


@pytest.fixture
def reg_settings(tmp_path, registry_uri):
    return isolated_settings(tmp_path, registry_uri)


def _client(uri: str):
    return tracking.client(uri)


def _versions(uri: str, tenant: str) -> dict[str, str]:
    """{release_id: version} of the tenant's registered model."""
    found = _client(uri).search_model_versions(f"name = '{tracking.registered_model_name(tenant)}'")
    return {v.tags["release_id"]: str(v.version) for v in found}


def _champion(uri: str, tenant: str):
    return _client(uri).get_model_version_by_alias(tracking.registered_model_name(tenant), "champion")


def _served_release(settings, tenant: str) -> str:
    """The release a fresh API process serves to a user of the tenant."""
    with TestClient(create_app(settings)) as client:
        r = client.get(f"/v1/tenants/{tenant}/users/u1/recommendations", params={"k": 3})
        assert r.status_code == 200, r.text
        return r.json()["release_id"]


def _cli_env(monkeypatch, settings, mlflow_uri: str) -> None:
    for name, value in {
        "RECSYS_HOME": str(settings.home),
        "RECSYS_ARTIFACT_ROOT": settings.artifact_root,
        "RECSYS_TENANTS_DIR": str(settings.tenants_dir),
        "MLFLOW_TRACKING_URI": mlflow_uri,
        "RECSYS_DATA_ROOT": str(settings.data_root),
    }.items():
        monkeypatch.setenv(name, value)
    from pipeline.config import get_settings

    get_settings.cache_clear()


def test_publish_registers_live_releases_and_rollback_moves_the_champion(
    reg_settings, registry_uri, small_df, monkeypatch, capsys
):
    tenant = "reg-a"
    cfg = write_tenant(reg_settings, tenant, small_df)
    first_ctx = RunContext(config=cfg, interval_end=INTERVAL_END, settings=reg_settings)
    first = run_all(first_ctx)
    rid1 = first["publish"]["release_id"]
    assert first["publish"]["registry"] == "registered" and first["publish"]["champion_alias"] == "moved"

    v1 = _champion(registry_uri, tenant)
    assert v1.tags["release_id"] == rid1
    assert v1.source == first_ctx.store.uri(f"{paths.releases_prefix(tenant)}/{rid1}")
    assert v1.run_id == first["refit"]["mlflow_run_id"]
    assert v1.tags["data_interval_end"] == INTERVAL_END.isoformat()
    assert json.loads(v1.tags["metrics"])["ndcg@10"] == first["evaluate"]["metrics"]["als"]["ndcg@10"]
    assert v1.tags["model"] == "als"

    # a rerun of the same interval ("already live") finds the version again: no second version
    again = run_all(first_ctx)["publish"]
    assert again["registry"] == "already registered" and again["model_version"] == str(v1.version)
    assert again["champion_alias"] == "unchanged"
    assert _versions(registry_uri, tenant) == {rid1: str(v1.version)}

    # the next interval: a new release, a new version, the alias follows the pointer
    second = run_all(RunContext(config=cfg, interval_end=INTERVAL_END + timedelta(days=1), settings=reg_settings))
    rid2 = second["publish"]["release_id"]
    assert second["publish"]["pointer_moved"] and second["publish"]["registry"] == "registered"
    assert _champion(registry_uri, tenant).tags["release_id"] == rid2
    assert set(_versions(registry_uri, tenant)) == {rid1, rid2}

    # a backfill of an older interval: written, not live -> no version, the alias stays
    backfill = run_all(RunContext(config=cfg, interval_end=INTERVAL_END - timedelta(days=10), settings=reg_settings))
    rid0 = backfill["publish"]["release_id"]
    assert not backfill["publish"]["pointer_moved"]
    assert backfill["publish"]["registry"] == "skipped (release not live)"
    assert _champion(registry_uri, tenant).tags["release_id"] == rid2
    assert set(_versions(registry_uri, tenant)) == {rid1, rid2}

    # rollback: pointer back to the first release, alias back to its (existing) version
    out = rollback(reg_settings, tenant)
    assert out["release_id"] == rid1 and out["moved"] and out["previous_release_id"] == rid2
    assert out["registry"] == "already registered" and out["champion_alias"] == "moved"
    assert out["model_version"] == str(v1.version)
    assert release.read_pointer(first_ctx.store, tenant)[0]["release_id"] == rid1
    assert _champion(registry_uri, tenant).version == v1.version
    assert _served_release(reg_settings, tenant) == rid1

    # the CLI, to a release that never went live (so never registered): a version is created
    _cli_env(monkeypatch, reg_settings, registry_uri)
    try:
        assert main(["rollback", tenant, "--to", rid0]) == EXIT_OK
        printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert printed["release_id"] == rid0 and printed["registry"] == "registered"
        champion = _champion(registry_uri, tenant)
        assert champion.tags["release_id"] == rid0 and str(champion.version) == printed["model_version"]
        assert champion.run_id == backfill["refit"]["mlflow_run_id"]  # found in the retained run folder
        assert set(_versions(registry_uri, tenant)) == {rid0, rid1, rid2}
        # rolling back to the live release moves nothing and leaves the alias where it is
        assert main(["rollback", tenant, "--to", rid0]) == EXIT_OK
        printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert printed["moved"] is False and printed["champion_alias"] == "unchanged"
    finally:
        from pipeline.config import get_settings

        get_settings.cache_clear()
    assert _served_release(reg_settings, tenant) == rid0


def test_mlflow_unreachable_still_publishes_and_rollback_resyncs(
    reg_settings, registry_uri, small_df, monkeypatch, capsys
):
    tenant = "reg-b"
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail fast instead of backing off for minutes
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    cfg = write_tenant(reg_settings, tenant, small_df)
    ctx = RunContext(config=cfg, interval_end=INTERVAL_END, settings=reg_settings)
    run_all(ctx, until="index")  # training needs MLflow; it goes away before publish
    down = reg_settings.model_copy(update={"mlflow_tracking_uri": UNREACHABLE})
    out = run_stage("publish", RunContext(config=cfg, interval_end=INTERVAL_END, settings=down))
    rid = out["release_id"]
    assert out["pointer_moved"] and out["live_release_id"] == rid
    assert out["registry"] == "failed" and "127.0.0.1" in out["registry_error"]
    release.load_release(ctx.store, tenant, rid)  # complete and verified: serving can use it
    assert tracking.registered_model_name(tenant) not in {
        m.name for m in _client(registry_uri).search_registered_models()
    }

    # a rollback while MLflow is still down: the pointer is what matters; exit 0 with a warning
    _cli_env(monkeypatch, reg_settings, UNREACHABLE)
    try:
        assert main(["rollback", tenant, "--to", rid]) == EXIT_OK
        captured = capsys.readouterr()
        assert json.loads(captured.out.strip().splitlines()[-1])["registry"] == "failed"
        assert f"python -m pipeline rollback {tenant} --to {rid}" in captured.err
    finally:
        from pipeline.config import get_settings

        get_settings.cache_clear()

    # MLflow back: the same command registers the live release (it predates the registry)
    synced = rollback(reg_settings, tenant, to=rid)
    assert synced["moved"] is False and synced["registry"] == "registered" and synced["champion_alias"] == "moved"
    champion = _champion(registry_uri, tenant)
    assert champion.tags["release_id"] == rid
    assert champion.run_id == ctx.read_result("refit")["mlflow_run_id"]
