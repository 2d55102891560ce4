"""Online experiments end to end through the real API (TestClient, the app's lifespan included):
a simulated population with a hidden preference per user and a position-biased click model
gets recommendations, clicks are POSTed with their recommendation_id and position, and the
report, built from the impression log and the event log only, must name the truly better arm
the winner with an interval excluding zero; an A/A split must not; a broken split must trip
the sample-ratio check. Impressions survive a server restart, and a failing impression log
never fails a request. (The many-seed A/A false-positive rate is measured at the analysis
level: tests/unit/test_experiments_analysis.py.)
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
import yaml
from fastapi.testclient import TestClient

from pipeline.cli import EXIT_OK, main
from pipeline.config import load_tenant
from pipeline.experiments import analysis, report
from pipeline.index import build as faiss_index
from pipeline.index import search as ann
from pipeline.release import format as rel
from pipeline.serving.app import create_app
from pipeline.storage import open_store, paths
from tests.conftest import isolated_settings

pytestmark = pytest.mark.integration
TENANT = "sim"
N_USERS, N_ITEMS, DIM, K = 1600, 300, 8, 10
LIKED = 30  # each user truly likes their 30 best items by the hidden taste vectors


@pytest.fixture
def cli_env(monkeypatch):
    """Point the CLI's settings (environment) at a test's Settings; cache cleared before and after."""
    from pipeline.config import get_settings

    def use(settings) -> None:
        for name, value in {
            "RECSYS_HOME": str(settings.home),
            "RECSYS_ARTIFACT_ROOT": settings.artifact_root,
            "RECSYS_TENANTS_DIR": str(settings.tenants_dir),
            "MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri,
        }.items():
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("RECSYS_REDIS_URL", raising=False)
        get_settings.cache_clear()

    yield use
    get_settings.cache_clear()


def _truth(seed: int = 0):
    rng = np.random.default_rng(seed)
    users = rng.standard_normal((N_USERS, DIM)).astype(np.float32)
    items = rng.standard_normal((N_ITEMS, DIM)).astype(np.float32)
    liked = np.argsort(-(users @ items.T), axis=1)[:, :LIKED]
    mask = np.zeros((N_USERS, N_ITEMS), dtype=bool)
    np.put_along_axis(mask, liked, True, axis=1)
    return rng, users, items, mask


def _release(store, users, items, interval: str, seed: int) -> str:
    index = ann.serialize(faiss_index.build_index(items)[0])
    files = rel.files_from_vectors(
        [f"u{i}" for i in range(N_USERS)],
        [f"i{j}" for j in range(N_ITEMS)],
        users,
        items,
        np.arange(N_USERS + 1, dtype=np.int64),  # one seen item each
        (np.arange(N_USERS) * 7 % N_ITEMS).astype(np.int32),
        index_bytes=index,
        model_meta={"kind": "test", "seed": seed},
        popular_items=50,
    )
    out = rel.publish_release(store, TENANT, files, {"run_id": f"run-{seed}", "data_interval_end": interval})
    return out.release_id


@pytest.fixture(scope="module")
def world(tmp_path_factory, mlflow_uri):
    """The live release ranks by noisy taste vectors; a pinned release ranks by the true ones."""
    root = tmp_path_factory.mktemp("experiments")
    settings = isolated_settings(
        root, mlflow_uri, release_poll_seconds=0, rate_limit="", tenant_work_limit="", impressions_flush_seconds=0.05
    )
    store = open_store(settings.artifact_root)
    rng, users, items, liked = _truth()
    noisy = (items + 1.5 * rng.standard_normal(items.shape)).astype(np.float32)
    worse = _release(store, users, noisy, "2026-03-02T00:00:00+00:00", 1)  # live
    better = _release(store, users, items, "2026-03-01T00:00:00+00:00", 2)  # older: written, not live
    assert rel.read_pointer(store, TENANT)[0]["release_id"] == worse
    return settings, store, liked, worse, better


def _configure(settings, experiments) -> None:
    doc = {"tenant": TENANT, "source": {"uri": "unused.csv"}, "experiments": experiments}
    (settings.tenants_dir / f"{TENANT}.yaml").write_text(yaml.safe_dump(doc))


def _arms(b: dict) -> list[dict]:
    return [{"name": "control", "share": 0.5}, {"name": "treatment", "share": 0.5, **b}]


def _simulate(client, liked, users: range, seed: int) -> dict[str, int]:
    """Each user gets one list; clicks follow a position-biased model of the hidden preference."""
    rng = np.random.default_rng(seed)
    variants: dict[str, int] = {}
    events = []
    for u in users:  # the simulated population: one request each
        body = client.get(f"/v1/tenants/{TENANT}/users/u{u}/recommendations", params={"k": K}).json()
        variants[str(body["variant"])] = variants.get(str(body["variant"]), 0) + 1
        rows = np.array([int(i["item_id"][1:]) for i in body["items"]])
        p = np.where(liked[u, rows], 0.35, 0.03) / np.sqrt(1 + np.arange(len(rows)))
        for pos in np.flatnonzero(rng.random(len(rows)) < p):
            events.append(
                {"user_id": f"u{u}", "item_id": body["items"][pos]["item_id"], "event_type": "click",
                 "recommendation_id": body["recommendation_id"], "position": int(pos)}
            )  # fmt: skip
        if rng.random() < 0.02 * (1 + liked[u, rows].sum() / 3):
            events.append({"user_id": f"u{u}", "item_id": body["items"][0]["item_id"], "event_type": "purchase",
                           "recommendation_id": body["recommendation_id"]})  # fmt: skip
    for start in range(0, len(events), 500):
        assert (
            client.post(f"/v1/tenants/{TENANT}/events", json={"events": events[start : start + 500]}).status_code == 202
        )
    return variants


def _report(settings, store, name: str) -> dict:
    cfg = load_tenant(TENANT, settings.tenants_dir)
    return report.build(store, cfg, name, datetime.now(UTC) + timedelta(days=1))


@pytest.mark.slow
def test_the_truly_better_arm_wins_through_the_api_and_impressions_survive_a_restart(world, cli_env, capsys):
    settings, store, liked, worse, better = world
    _configure(settings, [{"name": "ranker", "arms": _arms({"release": better})}])
    half = N_USERS // 2
    with TestClient(create_app(settings)) as client:
        client.app.state.variants.refresh(TENANT)  # load the pinned arm's release now (else: the next poll)
        first = _simulate(client, liked, range(half), seed=1)
    with TestClient(create_app(settings)) as client:  # a server restart in the middle of the experiment
        client.app.state.variants.refresh(TENANT)
        second = _simulate(client, liked, range(half, N_USERS), seed=2)
    assert set(first) == set(second) == {"control", "treatment"}
    writers = {k.rsplit("/", 1)[-1].split("-0")[0] for k in store.list(paths.impressions_prefix(TENANT) + "/")}
    assert len(writers) == 2  # one writer per server process
    doc = _report(settings, store, "ranker")
    assert doc["responses"] == N_USERS  # every response of both lifetimes was logged
    assert sum(a["impressions"] for a in doc["arms"]) == N_USERS * K  # an impression is an item shown
    control, treatment = doc["arms"]
    assert control["users"] + treatment["users"] == N_USERS and not doc["srm"]["mismatch"]
    assert treatment["verdict"] == analysis.WINNER and treatment["ctr_lift_ci"][0] > 0, treatment
    assert treatment["ctr"] > control["ctr"] and control["ctr_ci"][0] < control["ctr"] < control["ctr_ci"][1]

    cli_env(settings)
    end = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    assert main(["experiment", "report", TENANT, "ranker", "--interval-end", end, "--save"]) == EXIT_OK
    table = capsys.readouterr().out
    assert "treatment" in table and "winner" in table and "sample ratio" in table
    # the winner is promoted: the pointer moves to its release, recorded like a rollback
    assert main(["experiment", "promote", TENANT, "ranker", "treatment", "--by", "test:analyst"]) == EXIT_OK
    doc = rel.read_pointer(store, TENANT)[0]
    assert doc["release_id"] == better and doc["promotion"]["promoted_from"] == worse
    assert doc["promotion"]["by"] == "test:analyst" and not doc.get("pinned")
    assert main(["experiment", "promote", TENANT, "ranker", "control"]) != EXIT_OK  # serves live: nothing to move


@pytest.mark.slow
def test_an_aa_split_is_not_significant_and_a_broken_split_trips_srm(world):
    settings, store, liked, worse, better = world
    live = rel.read_pointer(store, TENANT)[0]["release_id"]
    _configure(
        settings,
        [
            {"name": "aa", "traffic": 0.5, "arms": _arms({})},
            # an arm whose release cannot load: its users silently get the default policy
            {"name": "broken", "traffic": 0.5, "arms": [{"name": "control", "share": 0.5},
             {"name": "treatment", "share": 0.5, "release": "run-9-0000000000"}]},
        ],
    )  # fmt: skip
    with TestClient(create_app(settings)) as client:
        client.app.state.variants.refresh(TENANT)
        _simulate(client, liked, range(N_USERS), seed=3)
    aa = _report(settings, store, "aa")
    assert aa["arms"][1]["verdict"] == analysis.NOT_YET and not aa["srm"]["mismatch"], aa["arms"]
    assert aa["arms"][1]["ctr_lift_ci"][0] < 0 < aa["arms"][1]["ctr_lift_ci"][1]
    broken = _report(settings, store, "broken")
    assert broken["srm"]["mismatch"] and not broken["trustworthy"]
    assert rel.read_pointer(store, TENANT)[0]["release_id"] == live


def test_a_failing_impression_log_never_fails_a_request(world):
    settings, store, liked, worse, better = world
    _configure(settings, [{"name": "ranker", "arms": _arms({"diversity": 0.3})}])

    class Broken:
        def log(self, row):
            raise RuntimeError("logger is broken")

        dropped = None

        def close(self) -> int:
            return 0

    with TestClient(create_app(settings)) as client:
        client.app.state.impressions.close()
        client.app.state.impressions = Broken()
        for u in range(20):
            r = client.get(f"/v1/tenants/{TENANT}/users/u{u}/recommendations")
            assert r.status_code == 200 and r.json()["variant"] in ("control", "treatment")
        r = client.post(f"/v1/tenants/{TENANT}/recommendations/batch", json={"user_ids": ["u1", "u2", "nobody"]})
        assert r.status_code == 200 and {x["variant"] for x in r.json()["results"]} <= {"control", "treatment"}


@pytest.mark.slow
def test_interleaving_names_the_better_ranking_through_the_api(world):
    settings, store, liked, worse, better = world
    arms = [{"name": "truth", "share": 0.5, "release": better}, {"name": "noisy", "share": 0.5, "release": worse}]
    _configure(settings, [{"name": "mix", "interleave": True, "arms": arms}])
    with TestClient(create_app(settings)) as client:
        client.app.state.variants.refresh(TENANT)
        assert _simulate(client, liked, range(400), seed=4) == {"interleaved": 400}
    got = _report(settings, store, "mix")["interleaving"]
    assert got["winner"] == "truth" and got["preference_ci"][0] > 0, got
    assert got["users"] == 400 and got["clicks"]["truth"] > got["clicks"]["noisy"]
