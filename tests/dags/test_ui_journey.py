"""The Airflow UI as its users live it, in Chromium against a real `airflow standalone` (SQLite):
sign in, unpause and trigger a tenant's DAG, read the train task's log while it trains (its
progress lines appear as they are written), watch the run succeed, open the tenant dashboard
from Airflow's navigation, run a backfill from Airflow's backfill dialog and see it complete.
A screenshot per step goes to var/test-artifacts/journey/.

The tenant is tiny (tests/integration/fast_tenant.py): the test is about the UI, not the model.
Only the first run trains long enough to be watched (LIVE_MODEL: more iterations, each a log
line); the file is switched back to the fast model before that run ends, so the runs after it
(the triggered one, the backfill) snapshot the fast one at their extract.
Waits poll the API or the page (no fixed sleeps), with generous limits for a busy CI box.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
import yaml

from tests.dags.conftest import ROOT
from tests.dags.standalone import Standalone, standalone
from tests.integration.fast_tenant import FAST

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(2400)]
ARTIFACTS = ROOT / "var" / "test-artifacts" / "journey"
CHROMIUM = Path("/usr/bin/chromium")
TENANT, DAG = "shop", "recsys_shop"
BACKFILL_DAY = "2025/03/30"  # one nightly tick (02:00) between From and To: one backfill run
RUN_WAIT = 1200.0  # seconds for one DAG run on a loaded 2-core box
# the watched run's train: 200 ALS iterations of 512 factors (~50 ms of CPU each), a progress
# line each (fit.py): ~10 s of progress lines even on a fast idle machine, where the UI refreshes
# a running task's log every 3 s (auto_refresh_interval); 128 factors gave 3.5 s, too close
LIVE_MODEL = {"factors": 512, "iterations": 200}
PROGRESS = re.compile(r"train als iteration (\d+)/200 ")
MORE_PROGRESS = """last => Math.max(...[...document.body.innerText.matchAll(/train als iteration (\\d+)\\/200 /g)]
  .map((m) => Number(m[1]))) > last"""


def _write_tenant(base: Path, model: dict) -> None:
    src = base / "sources" / "shop.csv"
    doc = {
        "tenant": TENANT,
        "source": {"uri": str(src), "columns": {"rating": "rating"}},
        "validation": {"min_rows": 50},
    }
    path = base / "tenants" / f"{TENANT}.yaml"
    tmp = path.with_suffix(".tmp")  # the scheduler and tasks read it meanwhile: never half-written
    tmp.write_text(yaml.safe_dump({**doc, **FAST, "model": model}))
    tmp.replace(path)


def _tenant(base: Path) -> dict[str, str]:
    from pipeline.samples import synthetic

    (base / "tenants").mkdir(parents=True)
    src = base / "sources" / "shop.csv"
    src.parent.mkdir()
    synthetic.interactions(n_users=150, n_items=80, mean_events=15, seed=11).to_csv(src, index=False)
    _write_tenant(base, LIVE_MODEL)
    # a broken file beside it: `make airflow` says so and makes it a DAG that fails with the reason
    (base / "tenants" / "broken.yaml").write_text("tenant: broken\nsource:\n  uri: x.csv\nmodel: {factors: -3}\n")
    return {
        "RECSYS_TENANTS_DIR": str(base / "tenants"),
        "RECSYS_HOME": str(base / "home"),
        "RECSYS_DATA_ROOT": str(base),
        "RECSYS_ARTIFACT_ROOT": str(base / "artifacts"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{base / 'mlflow.db'}",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
    }


def _api(server: Standalone, token: str, path: str) -> dict:
    r = httpx.get(f"{server.url}/api/v2/{path}", headers={"Authorization": f"Bearer {token}"}, timeout=60)
    r.raise_for_status()
    return r.json()


def _runs(server: Standalone, token: str) -> list[dict]:
    return _api(server, token, f"dags/{DAG}/dagRuns?limit=50")["dag_runs"]


def _running(ti: dict) -> bool:
    """Whether the task instance runs; an error if it already ended (it cannot be watched then)."""
    if ti["state"] in ("success", "failed", "upstream_failed", "skipped"):
        raise AssertionError(f"{ti['task_id']} of {ti['dag_run_id']} ended ({ti['state']}) before it was seen running")
    return ti["state"] == "running"


def _iterations(lines: list[str]) -> list[int]:
    return sorted(int(m.group(1)) for line in lines if (m := PROGRESS.search(line)))


def _pick_datetime(page, index: int, day: str, time: str) -> None:
    """Airflow's date-time field: a popover with a date and a time input."""
    page.get_by_test_id("datetime-input").nth(index).click()
    popover = page.locator("[data-scope=popover][data-part=content]:visible").last
    popover.get_by_placeholder("YYYY/MM/DD").fill(day)
    popover.get_by_placeholder("HH:mm").fill(time)
    popover.get_by_placeholder("HH:mm").press("Enter")
    page.get_by_text("Date Range").click()  # closes the popover, keeps the dialog


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail("CI must provide /usr/bin/chromium (Debian package chromium); .ci/run installs it")
        pytest.skip("no /usr/bin/chromium here (apt-get install chromium)")
    base = tmp_path_factory.mktemp("journey")
    with standalone(base, _tenant(base)) as s:
        yield s


def test_trigger_watch_logs_dashboard_and_backfill_in_the_ui(server):
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=120_000)  # the UI loads its bundle and translations first on a busy box
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    # 0. what `make airflow` (this same script) promises a newcomer, before any browser
    text = server.output()
    assert f"Airflow on {server.url}" in text and "simple_auth_manager_passwords.json.generated" in text
    assert f">>> tenant {TENANT}: config valid" in text and "broken.yaml does not validate" in text
    assert httpx.get(f"{server.url}/api/v2/dags", timeout=30).status_code == 401  # login needed
    token = server.token()
    ids = server.wait_for(
        "the tenant DAGs",
        lambda: (
            {d["dag_id"] for d in _api(server, token, "dags")["dags"]} >= {DAG, "recsys_broken"}
            and {d["dag_id"] for d in _api(server, token, "dags")["dags"]}
        ),
    )
    assert "recsys_maintenance" in ids
    assert _api(server, token, "pools/training")["slots"] == 1
    views = {v["name"]: v for p in _api(server, token, "plugins")["plugins"] for v in p["external_views"]}
    assert views["Recsys tenants"]["category"] == "browse"
    shots: list[str] = []

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_context(viewport={"width": 1400, "height": 900}).new_page()
        page.set_default_timeout(120_000)

        def shot(name: str) -> None:
            path = ARTIFACTS / f"{len(shots) + 1:02d}-{name}.png"
            page.screenshot(path=str(path))
            shots.append(path.name)

        # 1. sign in (SimpleAuthManager's page)
        page.goto(f"{server.url}/")
        page.get_by_label("Username").fill("admin")
        page.get_by_label("Password").fill(server.password())
        shot("login")
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url(lambda u: "/auth/" not in u)
        page.goto(f"{server.url}/dags")
        expect(page.get_by_role("link", name=DAG, exact=True)).to_be_visible()
        shot("dags-list")

        # 2. unpause with the toggle beside the DAG's name, then trigger a run
        page.get_by_role("link", name=DAG, exact=True).click()
        page.wait_for_url(f"**/dags/{DAG}")
        expect(page.get_by_role("link", name="Tenant dashboard")).to_be_visible()  # the DAG's own page
        page.get_by_test_id("toggle-pause").first.click()
        server.wait_for("the DAG unpaused", lambda: not _api(server, token, f"dags/{DAG}")["is_paused"], timeout=60)
        page.get_by_role("button", name="Trigger Dag").click()
        dialog = page.get_by_role("dialog")
        expect(dialog.get_by_text("Single Run", exact=True)).to_be_visible()
        shot("trigger-dialog")
        dialog.get_by_role("button", name="Trigger", exact=True).click()
        manual = server.wait_for(
            "the triggered run",
            lambda: next((r for r in _runs(server, token) if r["run_type"] == "manual"), None),
            timeout=120,
        )
        run_id = manual["dag_run_id"]
        run_path = f"{server.url}/dags/{DAG}/runs/{quote(run_id, safe='')}"

        # 3. the log of a stage still running: the first run (the unpause's nightly interval; one
        # active run at a time) trains LIVE_MODEL; its train log shows progress lines while the
        # API still says `running`, and more of them on the UI's next refresh
        first = server.wait_for(
            "the first run to start",
            lambda: next(iter(_api(server, token, f"dags/{DAG}/dagRuns?state=running")["dag_runs"]), None),
        )["dag_run_id"]
        first_ti = f"dags/{DAG}/dagRuns/{quote(first, safe='')}/taskInstances/train"
        server.wait_for("train to run", lambda: _running(_api(server, token, first_ti)), RUN_WAIT, 1)
        page.goto(f"{server.url}/dags/{DAG}/runs/{quote(first, safe='')}/tasks/train")
        progress = page.get_by_text(PROGRESS)
        expect(progress.first).to_be_visible()
        shown = _iterations(progress.all_inner_texts())
        state = _api(server, token, first_ti)["state"]
        assert state == "running", f"progress lines {shown} appeared only after train ended ({state})"
        shot("log-live")
        page.wait_for_function(MORE_PROGRESS, arg=max(shown))  # the UI's next refresh brings newer lines
        _write_tenant(server.home.parent, FAST["model"])  # before that run ends: the next runs are fast

        # 4. watch the triggered run reach success (the grid on the run's page)
        page.goto(run_path)
        shot("run-in-progress")
        state = server.wait_for(
            "the run to finish",
            lambda: (
                (s := _api(server, token, f"dags/{DAG}/dagRuns/{quote(run_id, safe='')}")["state"])
                in ("success", "failed")
                and s
            ),
            timeout=RUN_WAIT,
            every=5,
        )
        assert state == "success", server.output()[-4000:]
        page.reload()
        expect(page.get_by_text("success", exact=False).first).to_be_visible()
        shot("run-success")

        # 5. a task's log: the pipeline's own lines, tagged with tenant and stage
        page.goto(f"{run_path}/tasks/train")
        expect(page.get_by_text(f"tenant={TENANT}", exact=False).first).to_be_visible()
        shot("task-log")

        # 6. the dashboard from Airflow's navigation: Browse > Recsys tenants (inside the UI's frame)
        page.get_by_role("button", name="Browse").click()
        page.get_by_role("menuitem", name="Recsys tenants").click()
        frame = page.frame_locator("iframe").first
        expect(frame.locator("#fleet")).to_be_visible()
        expect(frame.get_by_role("link", name=TENANT, exact=True)).to_be_visible()
        expect(frame.get_by_text("config invalid")).to_be_visible()  # broken.yaml: failed, first
        shot("dashboard-fleet")
        frame.get_by_role("link", name=TENANT, exact=True).click()
        expect(frame.locator("#live-release")).to_be_visible()
        expect(frame.locator("canvas[data-metric]").first).to_be_visible()
        shot("dashboard-tenant")

        # 7. a backfill from Airflow's dialog: From/To around one nightly tick, then watch it complete
        page.goto(f"{server.url}/dags/{DAG}")
        page.get_by_role("button", name="Trigger Dag").click()
        dialog = page.get_by_role("dialog")
        dialog.get_by_text("Backfill", exact=True).click()
        _pick_datetime(page, 0, BACKFILL_DAY, "00:00")
        _pick_datetime(page, 1, BACKFILL_DAY, "12:00")
        expect(dialog.get_by_text("1 run will be triggered")).to_be_visible()
        shot("backfill-dialog")
        dialog.get_by_role("button", name="Run Backfill").click()
        backfill = server.wait_for(
            "the backfill", lambda: next(iter(_api(server, token, f"backfills?dag_id={DAG}")["backfills"]), None)
        )
        done = server.wait_for(
            "the backfill to complete",
            lambda: (b := _api(server, token, f"backfills/{backfill['id']}"))["completed_at"] and b,
            timeout=RUN_WAIT,
            every=5,
        )
        assert done["completed_at"]
        runs = [r for r in _runs(server, token) if r["run_type"] == "backfill"]
        assert [r["state"] for r in runs] == ["success"], runs
        page.goto(f"{server.url}/dags/{DAG}/backfills")
        shot("backfills-tab")
        browser.close()

    print(f"journey screenshots in {ARTIFACTS}: {', '.join(shots)}")
    assert all((ARTIFACTS / s).stat().st_size > 5_000 for s in shots)
