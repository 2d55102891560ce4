"""include/helm/values.yaml: values for the official Apache Airflow chart (KubernetesExecutor).

No cluster here: the file is checked against what it must agree with (the image's versions,
Airflow's own configuration options, the settings the pipeline reads) and its task policy is
run on the tasks of real tenant DAGs' wiring, with the Kubernetes models stubbed.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from pipeline.airflow_tasks import TRAINING_STAGES
from pipeline.config import Settings, TenantConfig
from pipeline.stages import STAGES

ROOT = Path(__file__).resolve().parents[2]
VALUES = yaml.safe_load((ROOT / "include" / "helm" / "values.yaml").read_text())
# top-level keys of the chart's values.schema.json that this file may use
CHART_KEYS = {
    "defaultAirflowRepository", "defaultAirflowTag", "airflowVersion", "executor", "postgresql", "data", "redis",
    "env", "extraEnvFrom", "config", "airflowLocalSettings", "scheduler", "dagProcessor", "apiServer", "triggerer",
    "dags", "logs",
}  # fmt: skip
# options of the cncf.kubernetes provider (not installed here; its config.yml is not readable)
KUBERNETES_EXECUTOR_OPTIONS = {"delete_worker_pods", "delete_worker_pods_on_failure", "worker_pods_creation_batch_size"}


def test_a_pod_per_task_with_the_projects_image_and_airflow():
    assert VALUES["executor"] == "KubernetesExecutor"
    assert set(VALUES) <= CHART_KEYS, set(VALUES) - CHART_KEYS
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==([^\s#]+)", (ROOT / "requirements.txt").read_text(), flags=re.M))
    assert VALUES["airflowVersion"] == pins["apache-airflow"]
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), flags=re.M).group(1)
    assert VALUES["defaultAirflowTag"] == version
    assert not VALUES["redis"]["enabled"]  # no broker for this executor
    assert VALUES["data"]["metadataSecretName"] and not VALUES["postgresql"]["enabled"]


def test_every_airflow_option_exists():
    spec = importlib.util.find_spec("airflow")
    template = Path(next(iter(spec.submodule_search_locations))) / "config_templates" / "config.yml"
    options = {section: set(body["options"]) for section, body in yaml.safe_load(template.read_text()).items()}
    for section, values in VALUES["config"].items():
        known = KUBERNETES_EXECUTOR_OPTIONS if section == "kubernetes_executor" else options[section]
        assert set(values) <= known, (section, set(values) - known)


def test_every_recsys_variable_is_one_the_pipeline_reads():
    fields = {f"RECSYS_{name.upper()}" for name in Settings.model_fields}
    source = "\n".join(p.read_text() for p in (ROOT / "pipeline").rglob("*.py"))
    for var in VALUES["env"]:
        name = var["name"]
        if name.startswith("RECSYS_"):
            assert name in fields or f'"{name}"' in source, name
    assert any(v["name"] == "RECSYS_ARTIFACT_ROOT" and v["value"].startswith("s3://") for v in VALUES["env"])


class _Model:
    """Stands in for a kubernetes.client model: keeps its keyword arguments."""

    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


@pytest.fixture
def task_policy(monkeypatch):
    models = types.ModuleType("kubernetes.client.models")
    for name in ("V1Pod", "V1PodSpec", "V1Container", "V1ResourceRequirements", "V1Toleration"):
        setattr(models, name, type(name, (_Model,), {}))
    client = types.ModuleType("kubernetes.client")
    client.models = models
    monkeypatch.setitem(sys.modules, "kubernetes", types.ModuleType("kubernetes"))
    monkeypatch.setitem(sys.modules, "kubernetes.client", client)
    monkeypatch.setitem(sys.modules, "kubernetes.client.models", models)
    namespace: dict = {}
    exec(compile(VALUES["airflowLocalSettings"], "airflowLocalSettings", "exec"), namespace)
    return namespace["task_policy"]


def _tasks(kind: str) -> dict[str, SimpleNamespace]:
    """The queue and pool of each stage's task, as dags/recsys_tenants.py wires them."""
    cfg = TenantConfig.model_validate({"tenant": "t", "source": {"uri": "x.csv"}, "model": {"kind": kind}})
    tasks = {}
    for stage in STAGES:
        training = stage in TRAINING_STAGES
        tasks[stage] = SimpleNamespace(
            queue=cfg.training.queue_for(*cfg.model_kinds()) if training else "default",
            pool=cfg.training.pool if training else "default_pool",
        )
    return tasks


def _requests(task) -> dict:
    [container] = task.executor_config["pod_override"].spec.containers
    assert container.name == "base"  # merged onto the chart's pod template's container
    return container.resources.requests


@pytest.mark.parametrize(("kind", "training_class"), [("als", "training"), ("two_tower", "gpu")])
def test_task_policy_sizes_each_pod_by_task_class(task_policy, kind, training_class):
    tasks = _tasks(kind)
    for task in tasks.values():
        task_policy(task)
    light = [_requests(t) for s, t in tasks.items() if s not in TRAINING_STAGES]
    heavy = [_requests(t) for s, t in tasks.items() if s in TRAINING_STAGES]
    assert all(r == {"cpu": "500m", "memory": "1Gi"} for r in light)  # extract, validate, ..., refresh
    for r, task in zip(heavy, (t for s, t in tasks.items() if s in TRAINING_STAGES), strict=True):
        spec = task.executor_config["pod_override"].spec
        if training_class == "gpu":
            assert r["nvidia.com/gpu"] == "1" and spec.tolerations and spec.node_selector
        else:
            assert r == {"cpu": "2", "memory": "8Gi"} and spec.tolerations is None
