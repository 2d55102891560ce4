"""The dashboard as Airflow serves it: plugin registration, Airflow auth, and a real browser."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from pipeline.config import get_settings
from pipeline.release import format as release
from pipeline.storage import open_store
from tests.dags.conftest import ROOT

pytestmark = [pytest.mark.integration]
ARTIFACTS = ROOT / "var" / "test-artifacts"


@pytest.fixture(scope="module")
def api_app(airflow_db):
    from airflow.api_fastapi.app import create_app

    return create_app()


def _token(role: str) -> str:
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    return get_auth_manager().generate_jwt(SimpleAuthManagerUser(username=role, role=role))


def test_plugin_registers_app_and_views(api_app):
    from airflow import plugins_manager

    apps, _ = plugins_manager.get_fastapi_plugins()
    assert any(a["url_prefix"] == "/recsys" for a in apps)
    plugins = {p.name: p for p in plugins_manager.get_plugins()} if hasattr(plugins_manager, "get_plugins") else {}
    if plugins:
        views = plugins["recsys"].external_views
        assert {v["destination"] for v in views} == {"nav", "dag"}
        assert all(not v["href"].startswith("/") for v in views)


def test_dashboard_is_behind_airflow_auth(api_app):
    client = TestClient(api_app)
    assert client.get("/recsys/").status_code == 401
    admin = {"Authorization": f"Bearer {_token('admin')}"}
    page = client.get("/recsys/", headers=admin)
    assert page.status_code == 200 and "acme" in page.text
    viewer = {"Authorization": f"Bearer {_token('viewer')}", "X-Recsys-Action": "rollback"}
    assert client.get("/recsys/tenants/acme", headers=viewer).status_code == 200
    denied = client.post("/recsys/api/tenants/acme/rollback", json={}, headers=viewer)
    assert denied.status_code == 403 and "edit permission" in denied.text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(api_app):
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(api_app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(100):
        if server.started:
            break
        time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def acme_live(airflow_db):
    """acme with two published releases. test_dag_run (marked slow) publishes them when it runs
    first; when it does not (`make test` leaves slow tests out), this runs the chain itself."""
    from datetime import UTC, datetime, timedelta

    from pipeline.config import load_tenant
    from pipeline.context import RunContext
    from pipeline.stages import run_all

    settings = get_settings()
    if release.read_pointer(open_store(settings.artifact_root), "acme") is None:
        cfg = load_tenant("acme", settings.tenants_dir)
        first = datetime(2026, 1, 1, 2, tzinfo=UTC)
        for end in (first, first + timedelta(days=1)):
            run_all(RunContext(config=cfg, interval_end=end, settings=settings))


def test_dashboard_in_a_real_browser(served, acme_live):
    chromium = Path("/usr/bin/chromium")
    if not chromium.exists():
        if os.environ.get("CI"):
            pytest.fail("CI must provide /usr/bin/chromium (Debian package chromium); .ci/run installs it")
        pytest.skip("no /usr/bin/chromium here (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    store = open_store(get_settings().artifact_root)
    live = release.read_pointer(store, "acme")[0]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(chromium),
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--disable-quic",
            ],
        )
        context = browser.new_context(viewport={"width": 1200, "height": 1400})
        context.add_cookies([{"name": "_token", "value": _token("admin"), "url": served}])
        page = context.new_page()
        page.goto(f"{served}/recsys/")
        page.get_by_role("link", name="acme").click()
        page.wait_for_url("**/recsys/tenants/acme")
        assert page.locator("#live-release").inner_text() == live["release_id"]
        assert page.locator("canvas[data-metric]").count() >= 4  # a Chart.js chart per metric
        page.wait_for_function("() => window.Chart && Object.keys(Chart.instances).length >= 4")
        assert "PUBLISH" in page.locator("#gate").inner_text()
        assert "passed" in page.locator("#validation").inner_text()
        assert page.locator("#releases tr").count() >= 3  # header + at least two releases
        page.screenshot(path=str(ARTIFACTS / "dashboard-tenant.png"), full_page=True)
        # roll back from the browser: confirm dialog, JSON POST, page reloads on the new live release
        target = page.locator("#releases button").first.get_attribute("data-release")
        page.on("dialog", lambda dialog: dialog.accept())
        page.locator("#releases button").first.click()
        page.wait_for_function("document.getElementById('message').textContent.startsWith('Live:')")
        assert release.read_pointer(store, "acme")[0]["release_id"] == target
        page.goto(
            page.locator("#data-docs").get_attribute("href").join([served, ""])
            if False
            else served + page.locator("#data-docs").get_attribute("href")
        )
        assert "Expectation" in page.content() or "expect" in page.content()
        browser.close()
    assert (ARTIFACTS / "dashboard-tenant.png").stat().st_size > 10_000
