"""Every stage's result.json records what it cost; MLflow and `pipeline summary` show it."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from pipeline.ops.summary import print_summary
from pipeline.stages import STAGES

pytestmark = pytest.mark.integration


def test_each_stage_records_its_cost(published):
    import mlflow

    ctx, results = published
    for stage in STAGES:
        recorded = ctx.read_result(stage)
        c = recorded["cost"]
        assert set(c) == {"cpu_s", "wall_s", "peak_rss_mb", "peak_rss_source"}, stage
        assert 0 < c["wall_s"] < 600 and 0 <= c["cpu_s"] < 600, (stage, c)
        assert 50 < c["peak_rss_mb"] < 16_000, (stage, c)  # an interpreter with pandas holds > 50 MB
        assert "cost" not in results[stage]  # XCom keeps the stage's own result: reruns compare equal
        assert {k: v for k, v in recorded.items() if k != "cost"} == results[stage]
    # the fit is the expensive part of a run, and CPU time is spent there, not waiting
    assert ctx.read_result("train")["cost"]["cpu_s"] > 0.05
    client = mlflow.MlflowClient(ctx.settings.mlflow_tracking_uri)
    metrics = client.get_run(results["refit"]["mlflow_run_id"]).data.metrics
    for stage in STAGES:
        assert metrics[f"cost.{stage}.cpu_s"] == pytest.approx(ctx.read_result(stage)["cost"]["cpu_s"])
    assert metrics["cost.total.wall_s"] == pytest.approx(
        sum(ctx.read_result(s)["cost"]["wall_s"] for s in STAGES), abs=0.01
    )
    out = io.StringIO()
    assert print_summary(ctx, console=Console(file=out, width=140))
    text = out.getvalue()
    assert "cost per stage" in text and "peak RSS MB" in text
    assert f"{ctx.read_result('train')['cost']['cpu_s']:.2f}" in text


def test_a_rejected_run_logs_its_costs_on_the_train_run(settings, small_df):
    import mlflow

    from pipeline.context import RunContext
    from pipeline.stages import GateRejected, run_all
    from tests.conftest import INTERVAL_END, write_tenant

    cfg = write_tenant(settings, "worse", small_df, model={"factors": 1, "iterations": 1, "regularization": 500.0})
    ctx = RunContext(config=cfg, interval_end=INTERVAL_END, settings=settings)
    with pytest.raises(GateRejected):
        run_all(ctx)
    ran = STAGES[: STAGES.index("gate") + 1]
    assert all(ctx.read_result(s)["cost"]["wall_s"] > 0 for s in ran) and ctx.read_result("refit") is None
    client = mlflow.MlflowClient(ctx.settings.mlflow_tracking_uri)
    metrics = client.get_run(ctx.read_result("train")["mlflow_run_id"]).data.metrics
    assert {k.split(".")[1] for k in metrics if k.startswith("cost.") and k.count(".") == 2} >= set(ran)
    assert metrics["cost.gate.peak_rss_mb"] == ctx.read_result("gate")["cost"]["peak_rss_mb"]
