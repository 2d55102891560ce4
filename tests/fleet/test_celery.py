"""Scale-out for real: CeleryExecutor, Redis as broker, two worker processes, S3 shared by all.

An Airflow deployment of separate processes (api-server, dag-processor, scheduler, two
`airflow celery worker`s; benchmarks/fleet.py) runs two tenants' nightly runs at once. The
workers serve different queues, as a deployment with training workers does: `light` takes
the `default` queue (extract, validate, features, evaluate, gate, index, publish, refresh),
`train` the `cpu` queue (select, train, refit of CPU model families). So every run's tasks
land on both workers, and each stage reads what a stage on the other worker wrote, through
S3 (moto's server): the releases that come out must verify byte for byte.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis

from benchmarks.fleet import Deployment, free_port, last_tick, make_tenants
from pipeline.release import format as release
from pipeline.release.verify import load_servable
from pipeline.stages import STAGES
from pipeline.storage import codecs, open_store, paths
from tests.conftest import REDIS_URL

pytestmark = [pytest.mark.slow, pytest.mark.integration]
TINY = {"kind": "als", "factors": 8, "iterations": 3}
WORKERS = {"light": "default", "train": "cpu"}  # worker name -> the queue it serves


@pytest.fixture
def bucket(s3_endpoint):
    import boto3

    name = f"fleet-{uuid.uuid4().hex[:8]}"
    boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    ).create_bucket(Bucket=name)
    return name


@pytest.fixture
def broker():
    """A Redis db and a key prefix of this test's own on the shared Redis; its keys removed after."""
    prefix = f"recsys-fleet-{uuid.uuid4().hex[:8]}:"
    url = REDIS_URL.rsplit("/", 1)[0] + "/9"
    yield url, prefix
    client = redis.Redis.from_url(url)
    for key in client.scan_iter(match=f"{prefix}*", count=500):
        client.delete(key)


def test_two_celery_workers_run_two_tenants_on_shared_s3(tmp_path: Path, s3_endpoint, bucket, broker, monkeypatch):
    broker_url, prefix = broker
    base = tmp_path / "fleet"
    tenants = make_tenants(base, 2, 3_000, last_tick(datetime.now(UTC)), seed=7, model=TINY)
    s3 = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": s3_endpoint,
        "RECSYS_ARTIFACT_ROOT": f"s3://{bucket}/artifacts",
    }
    dep = Deployment(
        base,
        name=f"recsys_celery_{uuid.uuid4().hex[:8]}",
        executor="CeleryExecutor",
        parallelism=4,
        extra_env={
            **s3,
            "AIRFLOW__CELERY__BROKER_URL": broker_url,
            "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__GLOBAL_KEYPREFIX": prefix,
            "AIRFLOW__CELERY__WORKER_PREFETCH_MULTIPLIER": "1",
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": "tests.fleet.hostname.worker_name",
        },
    )
    dep.extra_env["AIRFLOW__CELERY__RESULT_BACKEND"] = "db+" + dep.db_url.replace(
        "postgresql://", "postgresql+psycopg://"
    )
    dags = [f"recsys_{t}" for t in tenants]
    try:
        dep.create()
        for name, queue in WORKERS.items():
            dep.start(
                ("celery", "worker", "--queues", queue, "--concurrency", "1", "--celery-hostname", f"{name}@%h"),
                name=f"worker-{name}",
                env={"RECSYS_TEST_WORKER": name, "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port())},
            )
        dep.start_core()
        states = dep.wait_runs(dags, timeout=900)
        rows = [r for r in dep.task_rows() if r["dag_id"] in dags]
    finally:
        dep.stop()
        dep.drop()

    assert {d: states[d] for d in dags} == dict.fromkeys(dags, "success"), states
    for dag_id in dags:
        ran = {r["task_id"]: r for r in rows if r["dag_id"] == dag_id}
        assert {t: r["state"] for t, r in ran.items()} == dict.fromkeys(STAGES, "success")
        for r in ran.values():  # each task ran on the worker of its queue
            assert r["hostname"] == next(w for w, q in WORKERS.items() if q == r["queue"]), r
        assert {r["hostname"] for r in ran.values()} == set(WORKERS)  # one run, both workers

    for key, value in s3.items():
        monkeypatch.setenv(key, value)
    store = open_store(s3["RECSYS_ARTIFACT_ROOT"])
    interval_end = last_tick(datetime.now(UTC))
    run_id = paths.run_id_of(interval_end)
    for tenant in tenants:
        pointer, _ = release.read_pointer(store, tenant)
        servable = load_servable(store, tenant, pointer["release_id"])  # every file's sha256 checked
        assert servable.release.manifest["data_interval_end"] == interval_end.isoformat()
        for stage in STAGES:  # each stage's record, whichever worker ran it
            assert store.exists(paths.stage_key(tenant, run_id, stage, "result.json")), stage
        lease = codecs.read_json(store.get(paths.lease_key(tenant, run_id)))
        assert lease["released"] and lease["holder"].startswith("airflow:"), lease  # the last stage ended the run
