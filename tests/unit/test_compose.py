"""docker-compose.yml is for users (no Docker engine here): checked structurally."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from pipeline.config import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
# read by the code but deliberately not set: only used to mask the value in logs if present
NOT_NEEDED = {"AWS_SESSION_TOKEN"}


def _env_vars_read_by_code() -> set[str]:
    names = set()
    prefix = Settings.model_config["env_prefix"]
    for name, field in Settings.model_fields.items():
        names.add(str(field.validation_alias) if field.validation_alias else f"{prefix}{name}".upper())
    pattern = re.compile(r"""os\.environ(?:\.get|\.setdefault|\[)\(?\s*["']([A-Z0-9_]+)["']""")
    for path in (ROOT / "pipeline").rglob("*.py"):
        names |= set(pattern.findall(path.read_text()))
    names.add("AWS_ENDPOINT_URL")  # boto3 reads it: how MinIO is reached
    return names - NOT_NEEDED


def _service_env(service: dict) -> dict:
    return service.get("environment") or {}


def test_every_env_var_the_code_reads_is_set_for_pipeline_services():
    wanted = _env_vars_read_by_code()
    assert {"RECSYS_ARTIFACT_ROOT", "RECSYS_REDIS_URL", "MLFLOW_TRACKING_URI", "RECSYS_DEVICE"} <= wanted
    services = COMPOSE["services"]
    for name in ("airflow-scheduler", "airflow-worker", "airflow-dag-processor", "airflow-apiserver", "serving"):
        env = _service_env(services[name])
        missing = sorted(wanted - set(env))
        assert not missing, f"{name} lacks {missing}"
    assert services["serving"]["environment"]["RECSYS_ARTIFACT_ROOT"].startswith("s3://")


def test_airflow_runs_celery_on_postgres_and_redis_with_the_execution_api():
    env = _service_env(COMPOSE["services"]["airflow-scheduler"])
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql")
    assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://")
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"].endswith("/execution/")
    services = COMPOSE["services"]
    assert {
        "postgres",
        "redis-broker",
        "redis-embeddings",
        "minio",
        "minio-init",
        "mlflow",
        "airflow-init",
        "airflow-apiserver",
        "airflow-scheduler",
        "airflow-dag-processor",
        "airflow-triggerer",
        "airflow-worker",
        "serving",
    } <= set(services)
    assert "pools set training" in " ".join(services["airflow-init"]["command"])
    assert "--queues default,cpu" in services["airflow-worker"]["command"]
    assert "--queues gpu" in services["airflow-worker-gpu"]["command"]
    # MLflow never shares Airflow's database (both run Alembic)
    assert "/mlflow" in services["mlflow"]["command"] and "postgres/mlflow" in services["mlflow"]["command"]


def test_every_image_is_pinned():
    for name, service in COMPOSE["services"].items():
        image = service.get("image")
        assert image, f"{name} has no image"
        default = re.sub(r"\$\{[A-Z_]+:-([^}]+)\}", r"\1", image)
        assert ":" in default and not default.endswith(":latest"), f"{name}: {image} is not pinned"


def test_one_image_built_from_requirements():
    dockerfile = (ROOT / "Dockerfile").read_text()
    [base] = re.findall(r"^FROM (\S+)", dockerfile, flags=re.M)
    assert re.search(r":3\.3\.2-python3\.11$", base)
    assert re.search(r"pip install .*-r /opt/airflow/requirements.txt -c /opt/airflow/constraints.txt", dockerfile)
    assert "COPY --chown=airflow:root dags" in dockerfile and "COPY --chown=airflow:root plugins" in dockerfile
    builders = [n for n, s in COMPOSE["services"].items() if s.get("build")]
    images = {COMPOSE["services"][n]["image"] for n in builders}
    assert len(images) == 1  # every built service shares one image
