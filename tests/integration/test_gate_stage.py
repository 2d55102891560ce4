"""The gate stage against a live release on fresh events: paired bootstrap, guardrails, records."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import mlflow
import numpy as np
import pytest

from pipeline.context import RunContext, StageError
from pipeline.release import format as release
from pipeline.stages import GateRejected, run_all, run_stage
from pipeline.storage import codecs, paths

pytestmark = pytest.mark.integration

CHECKS = ["beats_popularity", "vs_champion", "coverage", "cold_item_recall", "long_tail_recall"]


def test_gate_compares_paired_users_after_the_champions_cutoff(ctx, settings):
    # the champion: data up to March 1st (the synthetic events run to April 1st)
    early = RunContext(config=ctx.config, interval_end=datetime(2025, 3, 1, tzinfo=UTC), settings=settings)
    champ_id = run_all(early)["publish"]["release_id"]
    try:
        published = run_all(ctx, until="gate")["gate"]["publish"]
    except GateRejected:
        published = False
    raw = ctx.store.get(ctx.key(paths.DECISION))
    decision = json.loads(raw, parse_constant=lambda c: pytest.fail(f"decision.json is not strict JSON: {c}"))
    assert decision["publish"] is published
    assert decision["basis"] == "same_holdout" and decision["champion_release_id"] == champ_id
    assert [c["name"] for c in decision["checks"]] == CHECKS
    ci = decision["ci"]
    assert ci["users"] >= ctx.config.gate.min_users and ci["resamples"] == 1000 and ci["confidence"] == 0.95
    assert ci["low"] <= ci["mean_diff"] <= ci["high"]
    vs = decision["checks"][1]
    assert vs["value"] == ci["low"] and vs["threshold"] == -ctx.config.gate.tolerance
    assert vs["passed"] is (ci["low"] >= -ctx.config.gate.tolerance)
    # the evidence: per-user pairs on events at/after the champion's cutoff only
    paired = codecs.read_parquet(ctx.store.get(ctx.key(paths.PAIRED)))
    assert len(paired) == ci["users"] == decision["champion"]["users"]
    assert ci["mean_diff"] == pytest.approx(float(np.mean(paired["challenger"] - paired["champion"])))
    for group in ("cold", "long_tail"):
        assert decision["champion"][group]["relevant"] >= 0
    assert decision["item_groups"]["long_tail"] == decision["item_groups"]["items"] - int(
        np.ceil(0.2 * decision["item_groups"]["items"])
    )
    # recorded on the train run in MLflow
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    run = mlflow.MlflowClient().get_run(ctx.read_result("train")["mlflow_run_id"])
    assert run.data.metrics["gate.vs_champion.ci_low"] == pytest.approx(ci["low"])
    assert run.data.metrics["gate.publish"] == float(published)
    assert run.data.tags["recsys.gate"] == ("publish" if published else "reject")
    assert run.data.tags["recsys.gate.vs_champion"] == vs["status"]
    assert run.data.tags["recsys.gate_champion"] == champ_id
    # seeded: the same evidence gives the same decision
    try:
        again = run_stage("gate", ctx)
    except GateRejected as exc:
        again = exc.decision
    assert again["ci"] == ci and again["checks"] == decision["checks"]
    if published:  # the release manifest carries the decision
        out = run_all(ctx)
        manifest = release.read_manifest(ctx.store, "acme", out["publish"]["release_id"])
        assert manifest["gate"]["basis"] == "same_holdout" and manifest["gate"]["ci"] == ci
        assert [c["name"] for c in manifest["gate"]["checks"]] == CHECKS


def test_gate_log_has_one_line_per_check(published, caplog):
    ctx, results = published
    with caplog.at_level("INFO", logger="pipeline.gate"):
        run_stage("gate", ctx)  # a rerun of the live interval: recorded basis, point comparison
    text = caplog.text
    decision = codecs.read_json(ctx.store.get(ctx.key(paths.DECISION)))
    assert decision["basis"].startswith("recorded") and decision["ci"] is None
    for c in decision["checks"]:
        assert f"{c['status']:<4} {c['name']}" in text
    assert decision["checks"][1]["name"] == "vs_champion" and "point comparison" in decision["checks"][1]["detail"]
    assert results["gate"]["publish"]


def test_an_item_item_challenger_is_gated_against_a_live_release(ctx, settings, small_df):
    from tests.conftest import write_tenant

    early = RunContext(config=ctx.config, interval_end=datetime(2025, 3, 1, tzinfo=UTC), settings=settings)
    champ_id = run_all(early)["publish"]["release_id"]  # an ALS release is live
    cfg = write_tenant(settings, "acme", small_df, selection={"candidates": [{"kind": "item_knn", "neighbours": 30}]})
    late = RunContext(config=cfg, interval_end=ctx.interval_end, settings=settings)
    try:
        run_all(late, until="gate")
    except GateRejected:
        pass
    decision = codecs.read_json(late.store.get(late.key(paths.DECISION)))
    assert late.read_result("train")["kind"] == "item_knn"
    assert decision["basis"] == "same_holdout" and decision["champion_release_id"] == champ_id
    paired = codecs.read_parquet(late.store.get(late.key(paths.PAIRED)))
    assert len(paired) == decision["ci"]["users"] and paired["challenger"].between(0, 1).all()
    assert paired["challenger"].mean() > 0  # the item-item model ranks the fresh events, not nothing
    run_stage("refit", late)
    with pytest.raises(StageError, match="cannot be served yet"):  # the serving side comes separately
        run_stage("index", late)
