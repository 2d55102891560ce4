"""End-to-end through Airflow itself: dag.test() runs every task in process."""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
import threading
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from pipeline.config import get_settings
from pipeline.release import format as release
from pipeline.storage import codecs, open_store, paths
from tests.dags.conftest import ENV

pytestmark = [pytest.mark.slow, pytest.mark.integration]
SENTINEL = "S3NT1NEL-do-not-log-8c2f"


def _states(dr) -> dict[str, str]:
    return {ti.task_id: str(ti.state) for ti in dr.get_task_instances()}


def _store():
    return open_store(get_settings().artifact_root)


def test_dag_test_runs_the_whole_chain_and_triggers_the_export(dagbag):
    dag = dagbag.get_dag("recsys_acme")
    dr = dag.test(logical_date=datetime(2026, 1, 2, tzinfo=UTC))
    states = _states(dr)
    assert str(dr.state) == "success", states
    assert set(states.values()) == {"success"}, states
    pointer, _ = release.read_pointer(_store(), "acme")
    manifest = release.read_manifest(_store(), "acme", pointer["release_id"])
    assert manifest["data_interval_end"] == dr.data_interval_end.isoformat()  # Airflow's interval, not the clock

    from airflow.models.asset import AssetEvent
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        events = session.scalars(
            select(AssetEvent).where(AssetEvent.source_dag_id == "recsys_acme", AssetEvent.source_run_id == dr.run_id)
        ).all()
        extras = [e.extra for e in events]
    assert any(x.get("release_id") == pointer["release_id"] for x in extras), extras

    export_run = dagbag.get_dag("recsys_acme_export").test()
    assert str(export_run.state) == "success", _states(export_run)
    table = codecs.read_parquet(_store().get(paths.export_key("acme", pointer["release_id"])))
    assert table.groupby("user_id").size().eq(5).all()


def test_gate_rejection_ends_skipped_not_failed(dagbag):
    dag = dagbag.get_dag("recsys_worse")
    dr = dag.test(logical_date=datetime(2026, 1, 2, tzinfo=UTC))
    states = _states(dr)
    assert str(dr.state) == "success", states
    assert states["evaluate"] == "success" and states["gate"] == "skipped", states
    assert all(states[t] == "skipped" for t in ("refit", "index", "publish", "refresh")), states
    assert release.read_pointer(_store(), "worse") is None


class _Hook(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self):  # noqa: N802
        self.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_broken_tenant_fails_with_the_reason_and_alerts(dagbag, monkeypatch):
    server = HTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("RECSYS_ALERT_WEBHOOK_URL", f"http://127.0.0.1:{server.server_port}/hook?token={SENTINEL}")
    get_settings.cache_clear()
    try:
        dr = dagbag.get_dag("recsys_broken").test()
    finally:
        server.shutdown()
        monkeypatch.delenv("RECSYS_ALERT_WEBHOOK_URL")
        get_settings.cache_clear()
    assert str(dr.state) == "failed"
    [message] = _Hook.received
    assert message["tenant"] == "broken" and message["task_id"] == "config_error"
    assert "model.factors" in message["reason"]


def _state(tenant: str) -> dict[str, str]:
    """sha256 of every artifact of a tenant, except the run summaries that carry timings and the
    runs' leases (wall-clock heartbeats, pipeline/storage/lease.py)."""
    store = _store()
    return {
        k: hashlib.sha256(store.get(k)).hexdigest()
        for k in store.list(f"tenants/{tenant}/")
        if not k.endswith("result.json") and not k.startswith(paths.leases_prefix(tenant))
    }


def test_three_day_backfill_twice_gives_the_same_state(dagbag):
    dag = dagbag.get_dag("recsys_acme")
    days = [datetime(2025, 3, d, 2, tzinfo=UTC) for d in (10, 11, 12)]
    for day in days:
        dr = dag.test(logical_date=day)
        assert str(dr.state) == "success" and set(_states(dr).values()) == {"success"}, _states(dr)
    first = _state("acme")
    for day in days:
        dr = dag.test(logical_date=day)
        assert str(dr.state) == "success" and set(_states(dr).values()) == {"success"}, _states(dr)
    assert _state("acme") == first
    runs = {k.split("/")[3] for k in first if "/runs/" in k}
    assert {"20250310T020000Z", "20250311T020000Z", "20250312T020000Z"} <= runs
    # older intervals are archived as releases, never made live over the newer one
    assert release.read_pointer(_store(), "acme")[0]["data_interval_end"].startswith("2026-01")


def test_backfill_cli_plans_one_run_per_day(dagbag):
    airflow = Path(sys.executable).with_name("airflow")
    out = subprocess.run(
        [
            str(airflow),
            "backfill",
            "create",
            "--dag-id",
            "recsys_acme",
            "--from-date",
            "2025-03-10",
            "--to-date",
            "2025-03-13",
            "--reprocess-behavior",
            "completed",
            "--dry-run",
        ],
        env={**__import__("os").environ, **ENV},
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    for day in ("2025-03-10 02:00:00", "2025-03-11 02:00:00", "2025-03-12 02:00:00"):
        assert day in out.stdout


def test_maintenance_dag_applies_retention_and_summarises_quality(dagbag):
    dr = dagbag.get_dag("recsys_maintenance").test(logical_date=datetime(2026, 1, 3, 4, 30, tzinfo=UTC))
    states = {(ti.task_id, ti.map_index): str(ti.state) for ti in dr.get_task_instances()}
    assert str(dr.state) == "success", states
    assert sum(1 for (t, _), s in states.items() if t == "retention" and s == "success") == 2  # acme, worse
    reports = _store().list("reports/data_quality/")
    doc = codecs.read_json(_store().get(reports[-1]))
    assert doc["tenants"]["acme"]["status"] == "pass"


def test_no_secret_in_logs_xcom_or_rendered_fields(dagbag, monkeypatch, capfd):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SENTINEL)
    monkeypatch.setenv("RECSYS_ALERT_WEBHOOK_URL", f"http://127.0.0.1:9/hook?token={SENTINEL}")
    get_settings.cache_clear()
    logging.getLogger().setLevel(logging.DEBUG)
    try:
        dr = dagbag.get_dag("recsys_acme").test(logical_date=datetime(2026, 1, 4, tzinfo=UTC))
    finally:
        logging.getLogger().setLevel(logging.WARNING)
        get_settings.cache_clear()
    assert str(dr.state) == "success"
    captured = capfd.readouterr()
    assert "refresh" in captured.out + captured.err  # the task logs were captured
    assert SENTINEL not in captured.out + captured.err

    from airflow.models.renderedtifields import RenderedTaskInstanceFields
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        xcoms = session.scalars(select(XComModel).where(XComModel.run_id == dr.run_id)).all()
        rendered = session.scalars(
            select(RenderedTaskInstanceFields).where(RenderedTaskInstanceFields.run_id == dr.run_id)
        ).all()
        assert xcoms and rendered
        blob = json.dumps([x.value for x in xcoms], default=str) + json.dumps(
            [r.rendered_fields for r in rendered], default=str
        )
    assert SENTINEL not in blob
