"""`challenger.mode: challenger` through the real chain: the gate's accepted release is published
and verified but not made live; serving gives it to the challenger arm only."""

from __future__ import annotations

from datetime import timedelta

import pytest
from fastapi.testclient import TestClient

from pipeline.context import RunContext
from pipeline.experiments.assign import assign
from pipeline.experiments.challenger import read_challenger
from pipeline.release import format as rel
from pipeline.serving.app import create_app
from pipeline.stages import run_all
from tests.conftest import INTERVAL_END, isolated_settings, write_tenant
from tests.integration.fast_tenant import FAST

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_challenger_mode_publishes_beside_the_live_release_and_serves_its_arm(tmp_path, mlflow_uri, small_df):
    settings = isolated_settings(tmp_path, mlflow_uri, release_poll_seconds=0, rate_limit="")
    cfg = write_tenant(settings, "acme", small_df, **FAST)
    first = run_all(RunContext(config=cfg, interval_end=INTERVAL_END, settings=settings))["publish"]
    assert first["pointer_moved"]  # nothing live yet: the first release goes live as always
    cfg = write_tenant(settings, "acme", small_df, **FAST, challenger={"mode": "challenger", "share": 0.3})
    later = RunContext(config=cfg, interval_end=INTERVAL_END + timedelta(days=1), settings=settings)
    second = run_all(later)["publish"]
    assert second["pointer_outcome"] == "challenger" and not second["pointer_moved"]
    assert "experiment promote acme challenger challenger" in second["pointer_reason"]
    store = later.store
    assert rel.read_pointer(store, "acme")[0]["release_id"] == first["release_id"]
    assert read_challenger(store, "acme")["release_id"] == second["release_id"] != first["release_id"]

    users = sorted(small_df["user_id"].astype(str).unique())
    arms = {u: got.arm.name for u in users if (got := assign("acme", cfg.live_experiments(), u)) is not None}
    assert {"control", "challenger"} <= set(arms.values()) and len(arms) < len(users)  # the rest: default
    with TestClient(create_app(settings)) as client:
        client.app.state.variants.refresh("acme")
        for u in users[:40]:  # a sample of the tenant's users
            body = client.get(f"/v1/tenants/acme/users/{u}/recommendations").json()
            expected = second["release_id"] if arms.get(u) == "challenger" else first["release_id"]
            assert (body["release_id"], body["variant"]) == (expected, arms.get(u)), u
