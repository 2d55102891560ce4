"""The tenant dashboard app (mounted in Airflow by plugins/recsys_view.py), tested standalone."""

from __future__ import annotations

from datetime import timedelta

import pytest
from fastapi.testclient import TestClient

from pipeline.context import RunContext
from pipeline.ops.dashboard import create_dashboard, metrics_svg
from pipeline.release import format as release
from pipeline.stages import run_all

pytestmark = pytest.mark.integration


@pytest.fixture
def two_releases(published):
    ctx, first = published
    later = RunContext(config=ctx.config, interval_end=ctx.interval_end + timedelta(days=1), settings=ctx.settings)
    second = run_all(later)
    return ctx, first["publish"]["release_id"], second["publish"]["release_id"]


def test_pages_show_live_release_history_gate_and_validation(two_releases):
    ctx, first, second = two_releases
    client = TestClient(create_dashboard(lambda: ctx.settings))
    index = client.get("/")
    assert index.status_code == 200 and "acme" in index.text and second in index.text
    page = client.get("/tenants/acme")
    assert page.status_code == 200
    text = page.text
    assert f'<code id="live-release">{second}</code>' in text
    assert first in text and "make live" in text  # history with a rollback action
    assert '<svg id="metrics-plot"' in text and "<polyline" in text
    assert "PUBLISH" in text and "beats_popularity" in text
    assert 'id="validation"' in text and "passed" in text
    assert '<table id="segments">' in text and "cold_warm" in text and "diversity@10" in text
    data = client.get("/api/tenants/acme").json()
    assert [r["release_id"] for r in data["releases"]] == [first, second]
    assert sum(g["users"] for g in data["segments"]["activity"].values()) > 0
    docs = data["validation"]["data_docs_path"]
    resp = client.get(f"/tenants/acme/runs/{data['validation']['run_id']}/data_docs/{docs}")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    assert client.get("/dag/recsys_acme_export", follow_redirects=False).headers["location"] == "/tenants/acme"


def test_rollback_action_needs_the_header_and_moves_the_pointer(two_releases):
    ctx, first, second = two_releases
    client = TestClient(create_dashboard(lambda: ctx.settings))
    url = "/api/tenants/acme/rollback"
    assert client.post(url, json={}).status_code == 403  # a cross-site form cannot send the header
    ok = client.post(url, json={"release_id": first}, headers={"X-Recsys-Action": "rollback"})
    assert ok.status_code == 200 and ok.json()["release_id"] == first
    assert release.read_pointer(ctx.store, "acme")[0]["release_id"] == first
    bad = client.post(url, json={"release_id": "20200101T000000Z-nothere000"}, headers={"X-Recsys-Action": "rollback"})
    assert bad.status_code == 409
    # the rollback pinned the tenant: the page says so and offers the unpin action (same guards)
    page = client.get("/tenants/acme").text
    assert 'id="pinned"' in page and "airflow-ui" in page and 'id="unpin"' in page
    assert client.post("/api/tenants/acme/unpin").status_code == 403
    unpinned = client.post("/api/tenants/acme/unpin", headers={"X-Recsys-Action": "unpin"})
    assert unpinned.status_code == 200 and unpinned.json()["was"]["release_id"] == first
    assert "pinned" not in release.read_pointer(ctx.store, "acme")[0]
    assert 'id="unpin"' not in client.get("/tenants/acme").text


def test_input_is_validated_and_escaped(two_releases):
    ctx, *_ = two_releases
    client = TestClient(create_dashboard(lambda: ctx.settings))
    assert client.get("/tenants/Not_A_Tenant").status_code == 422
    assert client.get("/tenants/nobody").status_code == 404
    assert client.get("/tenants/acme/runs/20250401T000000Z/data_docs/../../../../etc/passwd").status_code == 404
    assert client.get("/tenants/acme/runs/..%2F..%2Fx/data_docs/index.html").status_code in (404, 422)


def test_svg_escapes_nothing_dynamic_and_handles_empty():
    assert "No metrics" in metrics_svg([])
    svg = metrics_svg(
        [{"metrics": {"ndcg@10": 0.2}, "popularity_ndcg": 0.1}, {"metrics": {"ndcg@10": 0.25}, "popularity_ndcg": 0.1}]
    )
    assert svg.count("<polyline") == 2
