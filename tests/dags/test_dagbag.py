import os
import subprocess
import sys

from airflow.sdk import Asset

from pipeline.stages import STAGES
from tests.dags.conftest import ENV, ROOT


def test_no_import_errors_and_dags_per_tenant_file(dagbag):
    assert dagbag.import_errors == {}
    expected = {"recsys_acme", "recsys_acme_export", "recsys_worse", "recsys_broken", "recsys_maintenance"}
    assert expected | {"recsys_admin"} <= set(dagbag.dag_ids)


def test_tenant_dag_shape(dagbag):
    dag = dagbag.get_dag("recsys_acme")
    assert [t.task_id for t in dag.topological_sort()] == list(STAGES)
    assert dag.max_active_runs == 1 and not dag.catchup
    assert dag.timetable.expression == "0 2 * * *"
    assert {"recsys", "tenant:acme", "model:als"} <= set(dag.tags)
    for t in dag.tasks:
        assert t.retries == 2 and t.retry_exponential_backoff and t.execution_timeout is not None
        assert t.on_failure_callback
    for stage in ("select", "train", "refit"):
        assert dag.get_task(stage).pool == "training" and dag.get_task(stage).queue == "cpu"
    assert dag.get_task("extract").pool == "default_pool"
    assert '"tenant": "acme"' in dag.doc_md  # the effective config, defaults included
    [outlet] = dag.get_task("publish").outlets
    assert isinstance(outlet, Asset) and outlet.name == "recsys_acme_release"
    assert outlet.uri.endswith("tenants/acme/current.json")


def test_export_dag_is_scheduled_on_the_release_asset(dagbag):
    dag = dagbag.get_dag("recsys_acme_export")
    assert [t.task_id for t in dag.tasks] == ["export_topk"]
    assert "recsys_acme_release" in str(dag.timetable.asset_condition)


def test_maintenance_dag_maps_retention_over_tenants(dagbag):
    dag = dagbag.get_dag("recsys_maintenance")
    assert {t.task_id for t in dag.tasks} == {"tenants", "retention", "quality_summary"}
    assert type(dag.get_task("retention")).__name__.endswith("MappedOperator")


def test_broken_config_is_isolated_and_explains_itself(dagbag):
    dag = dagbag.get_dag("recsys_broken")
    assert [t.task_id for t in dag.tasks] == ["config_error"]
    assert "config-error" in dag.tags
    assert "model.factors" in dag.doc_md and "broken.yaml" in dag.doc_md
    assert "recsys_broken_export" not in dagbag.dag_ids


def test_dag_files_parse_without_heavy_imports():
    for name in ("recsys_tenants.py", "recsys_maintenance.py", "recsys_admin.py"):
        code = (
            "import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('d', r'{ROOT / 'dags' / name}')\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            "heavy = [n for n in ('torch', 'faiss', 'great_expectations', 'mlflow', 'redis', 'boto3', 'sklearn',"
            " 'pandas') if n in sys.modules]\n"
            "print(heavy); sys.exit(1 if heavy else 0)\n"
        )
        out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **ENV}, capture_output=True, text=True)
        assert out.returncode == 0, name + out.stdout + out.stderr[-2000:]


def test_pipeline_imports_without_airflow():
    code = (
        "import sys, importlib, pkgutil\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'airflow' or name.startswith('airflow.'): raise ImportError('airflow blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import pipeline\n"
        "for m in pkgutil.walk_packages(pipeline.__path__, 'pipeline.'):\n"
        "    if not m.name.endswith('__main__'): importlib.import_module(m.name)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]
