"""The experiments DAG: one mapped report task per tenant with experiments, run with dag.test()."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest
import yaml

from pipeline.config import get_settings
from pipeline.data import event_log
from pipeline.experiments import report
from pipeline.serving import impressions
from pipeline.storage import open_store
from tests.dags.conftest import TENANTS

pytestmark = [pytest.mark.slow, pytest.mark.integration]
SERVED = datetime(2026, 2, 1, 12, tzinfo=UTC)


def test_experiments_dag_shape(dagbag):
    dag = dagbag.get_dag("recsys_experiments")
    assert {t.task_id for t in dag.tasks} == {"tenants", "report"}
    assert type(dag.get_task("report")).__name__.endswith("MappedOperator")
    assert not dag.catchup and dag.max_active_runs == 1


def test_the_daily_task_reports_each_experiment_of_a_tenant(dagbag):
    path = TENANTS / "acme.yaml"
    original = path.read_text()
    doc = yaml.safe_load(original)
    doc["experiments"] = [{"name": "ranker", "arms": [{"name": "a", "share": 0.5}, {"name": "b", "share": 0.5}]}]
    path.write_text(yaml.safe_dump(doc))
    store = open_store(get_settings().artifact_root)
    try:
        rows = [
            impressions.record(
                "acme", f"r{i}", f"u{i}", "rel", ["i1", "i2"], SERVED, experiment="ranker", variant="ab"[i % 2]
            )  # fmt: skip
            for i in range(6)
        ]
        store.put(f"{impressions.prefix('acme')}/dt=2026-02-01/test-00000001.parquet", impressions.batch_bytes(rows))
        clicks = pd.DataFrame(
            {"user_id": ["u1", "u3"], "item_id": ["i1", "i2"], "timestamp": [SERVED, SERVED],
             "event_type": ["click", "click"], "recommendation_id": ["r1", "r3"], "position": [0, 1]}
        )  # fmt: skip
        event_log.append(store, "acme", clicks, received_at=SERVED + timedelta(minutes=1))
        dr = dagbag.get_dag("recsys_experiments").test(logical_date=datetime(2026, 2, 2, 0, 15, tzinfo=UTC))
        states = {(ti.task_id, ti.map_index): str(ti.state) for ti in dr.get_task_instances()}
        assert str(dr.state) == "success", states
        assert [k for k, s in states.items() if k[0] == "report" and s == "success"] == [("report", 0)]  # acme only
        got = report.latest(store, "acme", "ranker")
        assert got is not None and got["interval_end"].startswith("2026-02-02")
        by_arm = {a["arm"]: a for a in got["arms"]}
        assert (by_arm["a"]["users"], by_arm["a"]["clicks"]) == (3, 0)
        b = by_arm["b"]
        assert (b["users"], b["responses"], b["impressions"], b["clicks"]) == (3, 3, 6, 2)  # one list of 2 each
        assert b["ctr"] == pytest.approx(2 / 6)
    finally:
        path.write_text(original)
