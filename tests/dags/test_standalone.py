"""`make airflow`'s script from a fresh AIRFLOW_HOME: it comes up, says where to log in, and the
tenant DAGs and the dashboard are there for a logged-in user."""

from __future__ import annotations

import httpx
import pytest

from tests.dags.standalone import standalone

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_make_airflow_script_serves_the_dags_and_the_dashboard(tmp_path):
    with standalone(tmp_path) as server:
        text = server.output()
        assert f"Airflow on {server.url}" in text and "simple_auth_manager_passwords.json.generated" in text
        assert ">>> tenant acme: config valid" in text and "broken.yaml does not validate" in text
        assert httpx.get(f"{server.url}/api/v2/dags", timeout=30).status_code == 401  # login needed
        auth = {"Authorization": f"Bearer {server.token()}"}

        def dag_ids():
            r = httpx.get(f"{server.url}/api/v2/dags", headers=auth, timeout=30)
            ids = {d["dag_id"] for d in r.json()["dags"]}
            return ids if {"recsys_acme", "recsys_worse", "recsys_maintenance"} <= ids else None

        ids = server.wait_for("the tenant DAGs", dag_ids)
        assert "recsys_broken" in ids  # a broken tenant file is a DAG that fails with the reason
        pools = httpx.get(f"{server.url}/api/v2/pools/training", headers=auth, timeout=30).json()
        assert pools["slots"] == 1
        page = httpx.get(f"{server.url}/recsys/", headers=auth, timeout=60)
        assert page.status_code == 200 and 'id="fleet"' in page.text and "acme" in page.text
        plugins = httpx.get(f"{server.url}/api/v2/plugins", headers=auth, timeout=30).json()["plugins"]
        views = {v["name"]: v for p in plugins for v in p["external_views"]}
        assert views["Recsys tenants"]["category"] == "browse"
