import subprocess
import sys

from pipeline.stages import STAGES
from tests.dags.conftest import ENV, ROOT


def test_no_import_errors_and_one_dag_per_tenant_file(dagbag):
    assert dagbag.import_errors == {}
    assert {"recsys_acme", "recsys_worse", "recsys_broken"} <= set(dagbag.dag_ids)


def test_tenant_dag_shape(dagbag):
    dag = dagbag.get_dag("recsys_acme")
    assert [t.task_id for t in dag.topological_sort()] == list(STAGES)
    assert dag.max_active_runs == 1 and not dag.catchup
    assert "tenant:acme" in dag.tags
    for t in dag.tasks:
        assert t.retries == 2 and t.retry_exponential_backoff
    assert '"tenant": "acme"' in dag.doc_md


def test_broken_config_is_isolated_and_explains_itself(dagbag):
    dag = dagbag.get_dag("recsys_broken")
    assert [t.task_id for t in dag.tasks] == ["config_error"]
    assert "config-error" in dag.tags
    assert "model.factors" in dag.doc_md and "broken.yaml" in dag.doc_md


def test_dag_file_parses_without_heavy_imports():
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('d', r'{ROOT / 'dags' / 'recsys_tenants.py'}')\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "heavy = [n for n in ('torch', 'faiss', 'great_expectations', 'mlflow', 'redis', 'boto3', 'sklearn')"
        " if n in sys.modules]\n"
        "print(heavy); sys.exit(1 if heavy else 0)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env={**__import__("os").environ, **ENV}, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]


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
