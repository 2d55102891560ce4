"""A tenant with `two_stage: {enabled: true}` through the chain: train and refit fit rankers,
evaluate scores two-stage beside the model, the gate judges it against the single stage
(paired by user), publish ships the ranker when the gate chose it, and serving applies it:
what the API answers is what the offline two-stage recommender ranks."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

from pipeline.evaluation import metrics
from pipeline.features.dataset import Features
from pipeline.models import TrainData
from pipeline.models.io import read_model
from pipeline.release import format as release
from pipeline.samples import synthetic
from pipeline.serving.app import create_app
from pipeline.stages import GateRejected, run_all, run_stage
from pipeline.storage import codecs, paths
from pipeline.twostage import model as tsm
from pipeline.twostage import stage as two_stage
from pipeline.twostage.ranker import Ranker
from tests.conftest import INTERVAL_END, isolated_settings, write_tenant
from tests.integration.fast_tenant import GATE_OPEN

pytestmark = pytest.mark.integration
TWO_STAGE = {"enabled": True, "ranker": {"epochs": 30}}


@pytest.fixture(scope="module")
def chain(tmp_path_factory, mlflow_uri):
    from pipeline.context import RunContext

    root = tmp_path_factory.mktemp("twostage")
    settings = isolated_settings(root, mlflow_uri, release_poll_seconds=0, rate_limit="")
    df = synthetic.interactions(n_users=200, n_items=120, mean_events=18, seed=1)
    cfg = write_tenant(settings, "acme", df, two_stage=TWO_STAGE, gate=GATE_OPEN)
    ctx = RunContext(config=cfg, interval_end=INTERVAL_END, settings=settings)
    try:
        run_all(ctx, until="gate")
    except GateRejected:  # pragma: no cover - the open gate publishes
        raise
    return ctx


def test_evaluate_and_gate_judge_two_stage_against_the_single_stage(chain):
    ctx = chain
    ev = codecs.read_json(ctx.store.get(ctx.key(paths.METRICS)))
    assert {"als", "two_stage"} <= set(ev["metrics"])
    per_user = codecs.read_parquet(ctx.store.get(ctx.key(paths.PER_USER_METRICS)))
    assert per_user["two_stage_ndcg"].mean() == pytest.approx(ev["metrics"]["two_stage"]["ndcg@10"])
    decision = codecs.read_json(ctx.store.get(ctx.key(paths.DECISION)))
    judged = decision["two_stage"]
    diffs = per_user["two_stage_ndcg"] - per_user["als_ndcg"]
    assert judged["users"] == len(per_user) and judged["mean_diff"] == pytest.approx(diffs.mean(), abs=1e-6)
    policy = ctx.config.gate
    low = metrics.bootstrap_mean_ci(diffs.to_numpy(), policy.bootstrap_resamples, policy.confidence, policy.seed)[1]
    assert judged["serve"] == (diffs.mean() > 0 and low >= -policy.tolerance)
    # the trained ranker is the one evaluate scored: rebuilt from the files, it gives the same metric
    feats = Features.read(ctx)
    data = TrainData.from_events(feats.split(False), feats.n_users, feats.n_items)
    ranker = Ranker.from_bytes(ctx.store.get(ctx.key(paths.TRAINED_RANKER)))
    stage = tsm.TwoStage.build(ctx.config.two_stage, ranker, data, read_model(ctx, paths.TRAINED))
    assert tsm.evaluate(stage, feats.relevant(), 10)[0]["ndcg"] == pytest.approx(per_user["two_stage_ndcg"].mean())


def _publish(ctx, serve: bool) -> release.Release:
    """The rest of the chain after a gate decision that did (or did not) choose two stages."""
    decision = codecs.read_json(ctx.store.get(ctx.key(paths.DECISION)))
    decision["two_stage"]["serve"] = serve
    ctx.store.put(ctx.key(paths.DECISION), codecs.json_bytes(decision))
    for stage in ("refit", "index", "publish"):
        out = run_stage(stage, ctx)
    return release.load_release(ctx.store, "acme", out["release_id"])


def test_served_answers_are_the_offline_two_stage_ranking(chain):
    ctx = chain
    rel = _publish(ctx, serve=True)
    assert set(two_stage.RELEASE_FILES) <= set(rel.manifest["files"]) and rel.manifest["two_stage"] is True
    assert rel.manifest["gate"]["two_stage"]["serve"] is True
    feats = Features.read(ctx)
    data = TrainData.from_events(feats.events, feats.n_users, feats.n_items)
    ranker = Ranker.from_bytes(ctx.store.get(ctx.key(paths.REFIT_RANKER)))
    offline = tsm.TwoStage.build(ctx.config.two_stage, ranker, data, read_model(ctx, paths.REFITTED))
    rows = np.array([0, 17, 150])
    expected = offline.recommend(rows, 10)
    url = "/v1/tenants/acme/users/{}/recommendations"
    with TestClient(create_app(ctx.settings)) as c:
        for n, row in enumerate(rows):
            body = c.get(url.format(rel.user_ids[row]), params={"k": 10}).json()
            assert body["release_id"] == rel.release_id and not body["fallback"]
            got = [i["item_id"] for i in body["items"]]
            assert got == list(rel.item_ids[expected[n]])
            assert not set(got) & set(rel.item_ids[rel.seen(row)])
            scores = [i["score"] for i in body["items"]]
            assert scores == sorted(scores, reverse=True)
        # request exclusions hold for every source's candidates
        top = [i["item_id"] for i in c.get(url.format(rel.user_ids[0]), params={"k": 10}).json()["items"]]
        body = c.get(url.format(rel.user_ids[0]), params={"k": 10, "exclude": top[:3]}).json()
        assert not set(top[:3]) & {i["item_id"] for i in body["items"]} and len(body["items"]) == 10
        # unknown users still get the popular fallback
        assert c.get(url.format("nobody"), params={"k": 5}).json()["fallback"]


def test_two_stage_release_files_are_checksummed(chain):
    rel = _publish(chain, serve=True)
    key = paths.release_key("acme", rel.release_id, "ranker.safetensors")
    chain.store.put(key, chain.store.get(key) + b"\n")
    with pytest.raises(release.ReleaseError, match="checksum mismatch on ranker.safetensors"):
        release.load_release(chain.store, "acme", rel.release_id)


def test_a_single_stage_decision_ships_no_ranker(chain):
    """(Last: its release of the same interval is written, not made live.)"""
    rel = _publish(chain, serve=False)
    assert rel.two_stage is None and not set(two_stage.RELEASE_FILES) & set(rel.manifest["files"])
    assert chain.store.exists(chain.key(paths.REFIT_RANKER))  # fitted, but not shipped
