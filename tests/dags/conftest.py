"""Airflow under a throwaway AIRFLOW_HOME (SQLite), set before `airflow` is first imported.

The tenants folder holds two small synthetic tenants and one broken file, so the DagBag
test sees both the happy path and a broken config isolated to its own DAG.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BASE = Path(tempfile.mkdtemp(prefix="recsys-airflow-"))
atexit.register(shutil.rmtree, BASE, ignore_errors=True)
TENANTS = BASE / "tenants"
ENV = {
    "AIRFLOW_HOME": str(BASE / "airflow"),
    "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
    "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
    "RECSYS_HOME": str(BASE / "home"),
    "RECSYS_TENANTS_DIR": str(TENANTS),
    "RECSYS_DATA_ROOT": str(BASE),
    "MLFLOW_TRACKING_URI": f"sqlite:///{BASE / 'mlflow.db'}",
    "AIRFLOW__CORE__PARALLELISM": "4",
    "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin,viewer:viewer",
}
os.environ.update(ENV)


def _write_tenants() -> None:
    from pipeline.samples import synthetic

    TENANTS.mkdir(parents=True, exist_ok=True)
    src = BASE / "sources"
    src.mkdir(exist_ok=True)
    synthetic.interactions(n_users=150, n_items=80, mean_events=15, seed=11).to_csv(src / "small.csv", index=False)
    base = {
        "source": {"uri": "sources/small.csv", "columns": {"rating": "rating"}},
        "model": {"factors": 8, "iterations": 4},
        "validation": {"min_rows": 50},
    }
    (TENANTS / "acme.yaml").write_text(yaml.safe_dump({"tenant": "acme", **base, "export": {"k": 5}}))
    worse = {**base, "model": {"factors": 1, "iterations": 1, "regularization": 1000.0}}
    (TENANTS / "worse.yaml").write_text(yaml.safe_dump({"tenant": "worse", **worse}))
    (TENANTS / "broken.yaml").write_text("tenant: broken\nsource:\n  uri: x.csv\nmodel: {factors: -3}\n")


_write_tenants()


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """`airflow db migrate` once per session (dag.test needs a metadata DB)."""
    airflow = Path(sys.executable).with_name("airflow")
    out = subprocess.run([str(airflow), "db", "migrate"], env={**os.environ, **ENV}, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    from pipeline.config import get_settings

    get_settings.cache_clear()
    return BASE


@pytest.fixture(scope="session")
def dagbag(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(ROOT / "dags"))
