"""The tenant dashboard app (mounted in Airflow by plugins/recsys_view.py), tested standalone."""

from __future__ import annotations

from datetime import timedelta

import pytest
from fastapi.testclient import TestClient

from pipeline.context import RunContext
from pipeline.ops.dashboard import create_dashboard
from pipeline.release import format as release
from pipeline.stages import run_all
from tests.integration.browser import ARTIFACTS, chromium, served

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
    [row] = client.get("/api/fleet").json()
    assert row["tenant"] == "acme" and row["status"] == "published" and row["live"]["release_id"] == second
    # a tenant file that does not validate is a failed tenant, first in the fleet, with the reason
    (ctx.settings.tenants_dir / "zzz.yaml").write_text("tenant: zzz\nsource:\n  uri: x.csv\nmodel: {factors: -3}\n")
    broken, healthy = client.get("/api/fleet").json()
    assert (broken["tenant"], broken["health"], broken["status"]) == ("zzz", "failed", "config invalid")
    assert "factors" in broken["error"] and "zzz.yaml" in broken["error"] and healthy["tenant"] == "acme"
    index = client.get("/")
    assert "config invalid" in index.text and 'href="/tenants/zzz"' not in index.text
    (ctx.settings.tenants_dir / "zzz.yaml").unlink()
    assert row["last_run"]["stages_done"][-1] == "refresh" and row["gate"]["publish"] is True
    assert client.get("/static/chart.umd.min.js").text.startswith("/*!\n * Chart.js")
    assert client.get("/static/../dashboard.py").status_code == 404
    page = client.get("/tenants/acme")
    assert page.status_code == 200
    text = page.text
    assert f'<code id="live-release">{second}</code>' in text
    assert first in text and "make live" in text  # history with a rollback action
    assert 'data-metric="ndcg@10"' in text and 'data-metric="recall@10"' in text  # one chart per metric
    assert 'id="page-data"' in text and 'id="gate-checks"' in text and 'id="diff-summary"' in text
    assert "PUBLISH" in text and "beats_popularity" in text
    assert 'id="validation"' in text and "passed" in text
    assert '<table id="segments">' in text and "cold_warm" in text and "diversity@10" in text
    data = client.get("/api/tenants/acme").json()
    assert [r["release_id"] for r in data["releases"]] == [first, second]
    assert data["releases"][0]["popularity"]["ndcg@10"] is not None and "ndcg@10" in data["metric_names"]
    assert [r["status"] for r in data["runs"]] == ["published", "published"]
    last = data["runs"][-1]  # the synthetic source has no events in the second interval: a warning
    assert last["rows"] > 0 and last["interval_events"] == 0 and last["validation"]["warnings"] >= 1
    diff = data["diff"]  # live vs the release before it, by default
    assert (diff["old"], diff["new"]) == (first, second) and diff["available"]
    assert 0.0 <= diff["mean_overlap"] <= 1.0 and diff["shared_users"] > 0
    assert client.get(f"/api/tenants/acme?old={second}&new={first}").json()["diff"]["old"] == second
    assert client.get("/api/tenants/acme?old=20200101T000000Z-00aa").status_code == 404
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
    # pin from the page's action: the same header rule, a reason recorded
    assert client.post("/api/tenants/acme/pin", json={"reason": "sale"}).status_code == 403
    pinned = client.post("/api/tenants/acme/pin", json={"reason": "sale"}, headers={"X-Recsys-Action": "pin"})
    assert pinned.status_code == 200 and release.read_pointer(ctx.store, "acme")[0]["pinned"]["reason"] == "sale"
    assert client.post("/api/tenants/acme/drop", headers={"X-Recsys-Action": "drop"}).status_code == 404


def test_input_is_validated_and_escaped(two_releases):
    ctx, *_ = two_releases
    client = TestClient(create_dashboard(lambda: ctx.settings))
    assert client.get("/tenants/Not_A_Tenant").status_code == 422
    assert client.get("/tenants/nobody").status_code == 404
    assert client.get("/tenants/acme/runs/20250401T000000Z/data_docs/../../../../etc/passwd").status_code == 404
    assert client.get("/tenants/acme/runs/..%2F..%2Fx/data_docs/index.html").status_code in (404, 422)


def test_fleet_and_tenant_pages_in_a_real_browser(two_releases):
    """Charts drawn, fleet sorted and filtered, release diff compared, pin and rollback confirmed."""
    from playwright.sync_api import expect, sync_playwright

    browser_path = chromium()
    ctx, first, second = two_releases
    shots = ARTIFACTS
    shots.mkdir(parents=True, exist_ok=True)
    with served(create_dashboard(lambda: ctx.settings)) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(browser_path), args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1300, "height": 1600})
        page.goto(f"{url}/")
        expect(page.locator("#fleet tbody tr")).to_have_count(1)
        page.locator("#filter").fill("nobody")
        expect(page.locator("#fleet tbody tr:visible")).to_have_count(0)
        page.locator("#filter").fill("")
        page.locator("#fleet th", has_text="tenant").click()
        expect(page.locator("#fleet th[aria-sort=ascending]")).to_have_count(1)
        page.screenshot(path=str(shots / "dashboard-fleet.png"), full_page=True)
        page.get_by_role("link", name="acme", exact=True).click()
        page.wait_for_function("() => window.Chart && Object.keys(Chart.instances).length >= 5")
        expect(page.locator("#diff-overlap")).to_contain_text("%")
        page.screenshot(path=str(shots / "dashboard-tenant-charts.png"), full_page=True)
        dialogs: list[str] = []
        page.on("dialog", lambda d: (dialogs.append(d.type), d.accept("browser test")))
        page.locator("#pin").click()
        expect(page.locator("#pinned")).to_contain_text("browser test")  # the page reloaded, pinned
        assert dialogs == ["confirm", "prompt"]
        page.locator("#releases button[data-action=rollback]").first.click()
        expect(page.locator("#live-release")).to_have_text(first)
        browser.close()
    assert release.read_pointer(ctx.store, "acme")[0]["release_id"] == first
