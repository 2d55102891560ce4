"""Challenger mode end to end without a training run: a challenger release is published beside
the live one, the implicit `challenger` experiment's impressions and clicks are logged, two
daily reports are made, the dashboard section shows them (table, SRM, a Chart.js chart per metric,
checked in Chromium), and its promote action makes the winner live, recorded like a rollback."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest
import yaml
from fastapi.testclient import TestClient

from pipeline.config import load_tenant
from pipeline.data import event_log
from pipeline.experiments import report
from pipeline.experiments.assign import assign
from pipeline.experiments.challenger import publish_challenger, read_challenger
from pipeline.index import build as faiss_index
from pipeline.index import search as ann
from pipeline.ops.dashboard import create_dashboard
from pipeline.release import format as rel
from pipeline.serving import impressions
from pipeline.storage import open_store, paths
from tests.conftest import isolated_settings
from tests.integration.browser import ARTIFACTS, chromium, served

pytestmark = pytest.mark.integration
TENANT = "champ"
DAY1 = datetime(2026, 4, 1, 12, tzinfo=UTC)


def tiny(seed: int) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    users = rng.standard_normal((6, 4)).astype(np.float32)
    items = rng.standard_normal((8, 4)).astype(np.float32)
    return rel.files_from_vectors(
        [f"u{i}" for i in range(6)], [f"i{j}" for j in range(8)], users, items,
        np.arange(7, dtype=np.int64), (np.arange(6) % 8).astype(np.int32),
        index_bytes=ann.serialize(faiss_index.build_index(items)[0]), model_meta={"kind": "test", "seed": seed},
        popular_items=5,
    )  # fmt: skip


@pytest.fixture
def world(tmp_path, mlflow_uri):
    settings = isolated_settings(tmp_path, mlflow_uri)
    doc = {"tenant": TENANT, "source": {"uri": "x.csv"}, "challenger": {"mode": "challenger", "share": 0.4}}
    (settings.tenants_dir / f"{TENANT}.yaml").write_text(yaml.safe_dump(doc))
    store = open_store(settings.artifact_root)
    live = rel.publish_release(
        store, TENANT, tiny(1), {"run_id": "r1", "data_interval_end": "2026-03-01T00:00:00+00:00"}
    )
    out = publish_challenger(
        store, TENANT, tiny(2), {"run_id": "r2", "data_interval_end": "2026-03-02T00:00:00+00:00"}, 0.4
    )
    assert out["challenger"] and rel.read_pointer(store, TENANT)[0]["release_id"] == live.release_id
    assert read_challenger(store, TENANT)["release_id"] == out["release_id"]
    older = publish_challenger(
        store, TENANT, tiny(3), {"run_id": "r0", "data_interval_end": "2026-02-01T00:00:00+00:00"}, 0.4
    )
    assert not older["challenger"]  # an older interval never replaces the challenger
    cfg = load_tenant(TENANT, settings.tenants_dir)
    rng = np.random.default_rng(0)
    for day in range(2):  # two days of traffic: the challenger's items get clicked more
        when = DAY1 + timedelta(days=day)
        rows, clicks = [], []
        for u in range(1500):  # the simulated users of one day
            got = assign(TENANT, cfg.live_experiments(), f"user{u}")
            if got is None:
                continue
            rid = f"{day}-{u}"
            rows.append(impressions.record(TENANT, rid, f"user{u}", "x", ["i1", "i2"], when,
                                           experiment=got.experiment.name, variant=got.arm.name))  # fmt: skip
            if rng.random() < (0.3 if got.arm.name == "challenger" else 0.2):
                clicks.append({"user_id": f"user{u}", "item_id": "i1", "timestamp": when, "event_type": "click",
                               "recommendation_id": rid, "position": 0})  # fmt: skip
        key = f"{impressions.prefix(TENANT)}/dt={when:%Y-%m-%d}/t-{day}.parquet"
        store.put(key, impressions.batch_bytes(rows))
        event_log.append(store, TENANT, pd.DataFrame(clicks), received_at=when)
        ran = report.run(store, cfg, (when + timedelta(days=1)).replace(hour=0), settings.mlflow_tracking_uri)
        assert ran["challenger"]["mlflow"].startswith("run "), ran  # per-arm metrics logged to MLflow
    return settings, store, live.release_id, out["release_id"]


def test_dashboard_section_shows_reports_and_promotes_the_winner(world):
    settings, store, live, challenger = world
    client = TestClient(create_dashboard(lambda: settings))
    assert 'id="experiments-link"' in client.get(f"/tenants/{TENANT}").text
    data = client.get(f"/api/tenants/{TENANT}/experiments").json()
    [exp] = data["experiments"]
    assert exp["name"] == "challenger" and data["challenger"]["release_id"] == challenger
    assert [p[0] for p in exp["series"]["ctr"]["challenger"]] == ["2026-04-01", "2026-04-02"]
    latest = exp["latest"]
    arms = {a["arm"]: a for a in latest["arms"]}
    assert arms["challenger"]["verdict"] == "winner" and not latest["srm"]["mismatch"]
    page = client.get(f"/tenants/{TENANT}/experiments").text
    assert 'id="experiment-challenger"' in page and "Split ok" in page
    # a canvas per metric for Chart.js, and the same numbers as a table for pages without JS
    assert page.count('<canvas data-experiment="challenger"') == 2 and page.count('class="series-table"') == 2
    ctr = exp["series"]["ctr"]["challenger"][0]
    assert f"[{100 * ctr[2]:.2f}, {100 * ctr[3]:.2f}]" in page and "svg" not in page
    assert 'data-arm="challenger"' in page and "Promote" in page

    url = f"/api/tenants/{TENANT}/experiments/challenger/promote"
    assert client.post(url, json={"arm": "challenger"}).status_code == 403  # the CSRF header is required
    head = {"X-Recsys-Action": "promote"}
    assert client.post(url, json={"arm": "control"}, headers=head).status_code == 409  # serves live: nothing to move
    ok = client.post(url, json={"arm": "challenger", "reason": "won"}, headers=head)
    assert ok.status_code == 200, ok.text
    pointer = rel.read_pointer(store, TENANT)[0]
    assert pointer["release_id"] == challenger and pointer["promotion"]["promoted_from"] == live
    assert pointer["promotion"]["by"] == "airflow-ui" and read_challenger(store, TENANT) is None
    page = client.get(f"/tenants/{TENANT}/experiments").text
    assert "Promotions:" in page and challenger in page
    assert store.exists(f"{paths.experiment_prefix(TENANT, 'challenger')}/promotions.json")


def test_promotion_refuses_a_not_yet_significant_arm_unless_forced(world, tmp_path):
    settings, store, live, challenger = world
    from pipeline.experiments.promote import PromotionError, promote

    cfg = load_tenant(TENANT, settings.tenants_dir)
    store.put(report.report_key(TENANT, "challenger", "2026-04-03"), b'{"interval_end": "2026-04-04", "arms": '
              b'[{"arm": "challenger", "verdict": "not yet significant"}], "trustworthy": true}')  # fmt: skip
    with pytest.raises(PromotionError, match="not the winner"):
        promote(settings, TENANT, "challenger", "challenger")
    out = promote(settings, TENANT, "challenger", "challenger", force=True, by="test")
    assert out["moved"] and out["forced"] and rel.read_pointer(store, TENANT)[0]["release_id"] == challenger
    assert cfg.challenger.share == 0.4


# per chart: the x labels, each arm's line and band as Chart.js holds them, and how many points it laid out
CHARTS_JS = """() => Array.from(document.querySelectorAll("canvas[data-experiment]")).map((canvas) => {
  const chart = Chart.getChart(canvas);
  const sets = chart.data.datasets;
  const arms = {};
  sets.forEach((d, i) => {
    if (!d.band) arms[d.label] = {values: d.data, drawn: chart.getDatasetMeta(i).data.length};
  });
  sets.filter((d) => d.band).forEach((d) => {
    const [arm, , side] = d.label.split(" ");
    arms[arm][side] = d.data;
    if (side === "high") arms[arm].fill = d.fill;
  });
  return {metric: canvas.dataset.metric, labels: chart.data.labels, arms, width: canvas.width,
          table_open: canvas.closest(".experiment-chart").querySelector("details").open};
})"""


def test_experiment_charts_render_in_a_real_browser(world):
    """The charts are Chart.js instances holding every arm's line and 95% band, read from the
    page in Chromium; with JS off the page shows the same values as tables instead."""
    from playwright.sync_api import expect, sync_playwright

    browser_path = chromium()
    settings, *_ = world
    app = create_dashboard(lambda: settings)
    [exp] = TestClient(app).get(f"/api/tenants/{TENANT}/experiments").json()["experiments"]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with served(app) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(browser_path), args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1300, "height": 1400})
        page.goto(f"{url}/tenants/{TENANT}/experiments")
        page.wait_for_function("() => window.Chart && Object.keys(Chart.instances).length === 2")
        charts = page.evaluate(CHARTS_JS)
        page.screenshot(path=str(ARTIFACTS / "experiments-charts.png"), full_page=True)

        no_js = browser.new_context(java_script_enabled=False).new_page()
        no_js.goto(f"{url}/tenants/{TENANT}/experiments")
        expect(no_js.locator("details.series-table table").first).to_be_visible()
        expect(no_js.locator("canvas[data-experiment]").first).to_be_hidden()
        rows = no_js.locator("details.series-table").first.locator("tbody tr").all_inner_texts()
        browser.close()

    assert [c["metric"] for c in charts] == ["ctr", "conversion"]
    for c in charts:
        want = exp["series"][c["metric"]]
        assert set(c["arms"]) == set(want) == {"control", "challenger"}
        assert c["labels"] == ["2026-04-01", "2026-04-02"] and c["width"] > 100 and not c["table_open"]
        for arm, points in want.items():
            got = c["arms"][arm]
            assert got["values"] == [pt[1] for pt in points] and got["drawn"] == 2
            assert got["low"] == [pt[2] for pt in points] and got["high"] == [pt[3] for pt in points]
            bands = zip(got["low"], got["values"], got["high"], strict=True)
            assert got["fill"] == "-1" and all(lo <= v <= hi for lo, v, hi in bands), got
    assert len(rows) == 4 and sum("challenger" in r for r in rows) == 2  # two days of CTR for both arms
