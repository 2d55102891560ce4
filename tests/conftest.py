"""Shared fixtures: isolated settings per test, a synthetic tenant, real Redis with a unique prefix."""

from __future__ import annotations

import os
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
os.environ.setdefault("RECSYS_DEVICE", "cpu")

from pipeline.config import Settings, TenantConfig  # noqa: E402
from pipeline.context import RunContext  # noqa: E402
from pipeline.samples import synthetic  # noqa: E402

REDIS_URL = os.environ.get("RECSYS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
INTERVAL_END = datetime(2025, 4, 1, tzinfo=UTC)


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory) -> str:
    """One MLflow sqlite DB per session: creating one costs seconds of migrations."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def isolated_settings(root: Path, mlflow_uri: str, **overrides) -> Settings:
    """Settings whose every path is under `root` (tenants/ created), embedded store, no auth."""
    (root / "tenants").mkdir(exist_ok=True)
    values = {
        "home": root / "home",
        "artifact_root": str(root / "artifacts"),
        "data_root": root,
        "tenants_dir": root / "tenants",
        "mlflow_tracking_uri": mlflow_uri,
        "redis_url": None,
        "auth_disabled": True,
    }
    return Settings(**{**values, **overrides})


@pytest.fixture
def settings(tmp_path: Path, mlflow_uri: str) -> Settings:
    return isolated_settings(tmp_path, mlflow_uri)


def write_tenant(settings: Settings, tenant: str, df, **overrides) -> TenantConfig:
    """Write `df` as the tenant's CSV source and a tenant YAML; return the validated config."""
    src = settings.data_root / "sources" / tenant / "interactions.csv"
    src.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(src, index=False)
    doc = {
        "tenant": tenant,
        "source": {
            "uri": str(src),
            "columns": {"user_id": "user_id", "item_id": "item_id", "timestamp": "timestamp", "rating": "rating"},
        },
        "model": {"factors": 16, "iterations": 8},
        "validation": {"min_rows": 50},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(doc.get(key), dict):
            doc[key] = {**doc[key], **value}
        else:
            doc[key] = value
    path = Path(settings.tenants_dir) / f"{tenant}.yaml"
    path.write_text(yaml.safe_dump(doc))
    from pipeline.config import load_tenant_file

    return load_tenant_file(path)


@pytest.fixture
def small_df():
    return synthetic.interactions(n_users=200, n_items=120, mean_events=18, seed=1)


@pytest.fixture
def tenant_cfg(settings, small_df) -> TenantConfig:
    return write_tenant(settings, "acme", small_df)


@pytest.fixture
def ctx(settings, tenant_cfg) -> RunContext:
    return RunContext(config=tenant_cfg, interval_end=INTERVAL_END, settings=settings)


@pytest.fixture
def redis_prefix():
    """A unique key prefix on the real Redis server; every key under it is deleted afterwards."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.fail(f"Redis is not reachable at {REDIS_URL}: start it (.ci/run does)")
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    yield prefix
    for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        client.delete(key)
    client.close()


@pytest.fixture
def published(ctx):
    """The whole chain run once for tenant acme: (ctx, results)."""
    from pipeline.stages import run_all

    return ctx, run_all(ctx)


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real HTTP S3 endpoint (moto's server mode), shared by the session; tests use own buckets."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one INFO line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_env(s3_endpoint, monkeypatch) -> str:
    """boto3 (and so S3Store and open_store) pointed at the moto server with dummy credentials."""
    for k, v in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": s3_endpoint,
    }.items():
        monkeypatch.setenv(k, v)
    return s3_endpoint


@pytest.fixture
def s3_store(s3_env):
    """An S3Store under `prefix/` of a fresh bucket on the moto server."""
    import uuid

    import boto3

    from pipeline.storage.s3 import S3Store

    bucket = f"t-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return S3Store(f"s3://{bucket}/prefix")


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    """Each store kind in turn: a local folder, then S3 through the moto server."""
    from pipeline.storage import LocalStore

    return LocalStore(tmp_path / "artifacts") if request.param == "local" else request.getfixturevalue("s3_store")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: intra-op threads only add contention (and stalls on a busy CI box)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
