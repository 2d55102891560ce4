"""End-to-end through Airflow itself: dag.test() runs every task in process."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from pipeline import release
from pipeline.config import get_settings
from pipeline.storage import open_store

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _states(dr) -> dict[str, str]:
    return {ti.task_id: str(ti.state) for ti in dr.get_task_instances()}


def test_dag_test_runs_the_whole_chain(dagbag):
    dag = dagbag.get_dag("recsys_acme")
    dr = dag.test(logical_date=datetime(2026, 1, 2, tzinfo=UTC))
    states = _states(dr)
    assert str(dr.state) == "success", states
    assert set(states.values()) == {"success"}, states
    store = open_store(get_settings().artifact_root)
    pointer, _ = release.read_pointer(store, "acme")
    manifest = release.read_manifest(store, "acme", pointer["release_id"])
    # the run used Airflow's data interval, not the wall clock
    assert manifest["data_interval_end"] == dr.data_interval_end.isoformat()


def test_gate_rejection_ends_skipped_not_failed(dagbag):
    dag = dagbag.get_dag("recsys_worse")
    dr = dag.test(logical_date=datetime(2026, 1, 2, tzinfo=UTC))
    states = _states(dr)
    assert str(dr.state) == "success", states
    assert states["evaluate"] == "success" and states["gate"] == "skipped", states
    assert all(states[t] == "skipped" for t in ("refit", "index", "publish", "refresh")), states
    assert release.read_pointer(open_store(get_settings().artifact_root), "worse") is None


def test_broken_tenant_dag_fails_with_the_reason(dagbag):
    dag = dagbag.get_dag("recsys_broken")
    dr = dag.test()
    assert str(dr.state) == "failed"
