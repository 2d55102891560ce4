"""The thin adapter between Airflow task contexts and pipeline stages.

The only module of `pipeline` that talks to Airflow, and only inside functions (importing
it needs no Airflow), so the serving image and the tests of everything else stay free of
it. DAG files call these functions; they hold no logic of their own.
"""

from __future__ import annotations

import json
import logging
import os
import time
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

# per-stage execution timeouts (minutes); training stages also go to the `training` pool
TIMEOUT_MINUTES = {
    "extract": 60,
    "validate": 60,
    "features": 60,
    "select": 480,
    "train": 240,
    "evaluate": 60,
    "gate": 30,
    "refit": 240,
    "index": 60,
    "publish": 30,
    "refresh": 60,
}
TRAINING_STAGES = frozenset({"select", "train", "refit"})


def _secret_values() -> list[str]:
    """Values that must never reach logs, XCom or rendered fields."""
    from pipeline.config import get_settings

    s = get_settings()
    out = [os.environ.get(n, "") for n in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")]
    for url in (s.redis_url, s.mlflow_tracking_uri, s.alert_webhook_url):
        if url:
            parts = urlsplit(url)
            out += [parts.password or "", parts.query]
            if s.alert_webhook_url == url:
                out.append(url)
    return [v for v in out if v and len(v) >= 4]


def mask_secrets() -> None:
    from airflow.sdk.log import mask_secret

    for value in _secret_values():
        mask_secret(value)


def interval_of(context: dict[str, Any]) -> tuple[datetime | None, datetime]:
    end = context.get("data_interval_end") or context.get("logical_date") or context["dag_run"].run_after
    return context.get("data_interval_start"), end


def holder_of(context: dict[str, Any]) -> Any:
    """The run's lease holder: the dag run (its tasks continue one run) and the task's try number
    (a duplicate delivery of an older try is refused; pipeline/storage/lease.py)."""
    from pipeline.storage.lease import Holder

    ti = context.get("ti") or context.get("task_instance")
    dag_run = context.get("dag_run")
    dag_id = getattr(ti, "dag_id", None) or getattr(dag_run, "dag_id", "") or ""
    run_id = getattr(dag_run, "run_id", None) or getattr(ti, "run_id", "") or ""
    return Holder.airflow(dag_id, run_id, int(getattr(ti, "try_number", None) or 1))


def run_stage(stage: str, tenant_file: str, **context: Any) -> dict[str, Any]:
    """Task body: the Airflow context becomes a RunContext; outcomes map to Airflow states.

    Gate rejection -> skipped (the run succeeds); bad input -> failed without retries (and the
    interval's lease released); another copy holding the interval, or this copy having lost it
    -> failed without retries; anything else (Redis or S3 down, ...) -> an ordinary failure
    that Airflow retries (the retry, a higher try of the same dag run, continues the lease).
    """
    entered = time.time()
    from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

    from pipeline.config import TenantConfigError, load_tenant_file
    from pipeline.context import RunContext, StageError
    from pipeline.stages import GateRejected
    from pipeline.stages import run_stage as run
    from pipeline.stages import stage as load_stage
    from pipeline.storage.lease import LeaseHeld, LeaseLost

    bad_input: tuple[type[Exception], ...] = (StageError, TenantConfigError)
    if stage == "validate":  # the validation stage's module only where it runs
        from pipeline.validation.stage import ValidationFailed

        bad_input += (ValidationFailed,)
    load_stage(stage)  # imported before the stage's clock starts: imports are timed on their own
    imported = time.time()
    mask_secrets()
    start, end = interval_of(context)
    ctx = None
    try:
        ctx = RunContext(
            config=load_tenant_file(tenant_file), interval_end=end, interval_start=start, holder=holder_of(context)
        )
        began, cpu = time.time(), time.process_time()
        result = run(stage, ctx)
    except GateRejected as exc:
        raise AirflowSkipException(f"gate rejected the model: {exc}") from exc
    except (LeaseHeld, LeaseLost) as exc:
        raise AirflowFailException(str(exc)) from exc  # a second copy or a zombie: retrying must not win
    except bad_input as exc:
        if ctx is not None:
            ctx.release_lease()  # the run is over: another run of the interval may start at once
        raise AirflowFailException(str(exc)) from exc  # bad input: retrying will not help
    if stage == "publish":
        for outlet in getattr(context.get("task"), "outlets", None) or []:
            context["outlet_events"][outlet].extra = {
                "tenant": ctx.tenant,
                "release_id": result["release_id"],
                "pointer_moved": result["pointer_moved"],
                "data_interval_end": ctx.interval_end.isoformat(),
            }
    returned = time.time()
    # where a task's time went (benchmarks/tenants.py joins it with the task instance's timestamps)
    timing = {
        "entered": entered,  # task process start + DAG parse end here
        "import_s": round(imported - entered, 4),
        "stage_s": round(returned - began, 4),
        "stage_cpu_s": round(time.process_time() - cpu, 4),
        "returned": returned,
    }
    log.info("task timing: %s", json.dumps(timing))
    return {**result, "task_timing": timing}


def on_failure(context: dict[str, Any]) -> None:
    """Failure callback: log tenant, run and reason; call the configured webhook, if any."""
    from pipeline.ops.alerts import notify_failure

    ti = context.get("ti") or context.get("task_instance")
    dag_id = getattr(ti, "dag_id", "") or ""
    notify_failure(
        tenant=dag_id.removeprefix("recsys_"),
        dag_id=dag_id,
        run_id=getattr(ti, "run_id", "") or "",
        task_id=getattr(ti, "task_id", "") or "",
        reason=str(context.get("exception") or "unknown"),
    )


def release_asset_uri(tenant: str) -> str:
    """The Asset a tenant's publish task emits: its release pointer in the artifact store."""
    from pipeline.config import get_settings
    from pipeline.storage import paths

    root = get_settings().artifact_root.rstrip("/")
    if not root.startswith("s3://"):
        root = "file://" + os.path.abspath(root.removeprefix("file://"))
    return f"{root}/{paths.pointer_key(tenant)}"


def export_release(tenant_file: str, **context: Any) -> dict[str, Any]:
    """Asset-triggered export: top-k per user of the release named by the triggering event."""
    from pipeline.config import get_settings, load_tenant_file
    from pipeline.release.export import export_topk
    from pipeline.storage import open_store

    cfg = load_tenant_file(tenant_file)
    release_id = None
    for events in (context.get("triggering_asset_events") or {}).values():
        for event in events:
            release_id = (event.extra or {}).get("release_id") or release_id
    return export_topk(open_store(get_settings().artifact_root), cfg, release_id)


def apply_retention(tenant: str) -> dict[str, Any]:
    from pipeline.config import get_settings, load_tenant
    from pipeline.ops import maintenance
    from pipeline.storage import open_store
    from pipeline.storage.redis import redis_client

    s = get_settings()
    redis = redis_client(s.redis_url) if s.redis_url else None
    cfg = load_tenant(tenant, s.tenants_dir)
    return maintenance.apply_retention(open_store(s.artifact_root), cfg, redis, s.redis_prefix, s.redis_grace_seconds)


def quality_summary(day_end: datetime) -> dict[str, Any]:
    from pipeline.config import get_settings
    from pipeline.ops import maintenance
    from pipeline.storage import open_store

    s = get_settings()
    return maintenance.quality_summary(
        open_store(s.artifact_root), maintenance.valid_configs(s), day_end.strftime("%Y-%m-%d")
    )


def release_action(**context: Any) -> dict[str, Any]:
    """The admin DAG's task: rollback, pin or unpin from the trigger form's params.

    Refusals (bad tenant, nothing to roll back, a lost race, a blocklisted target) fail the
    task without retry: a person reads the message and decides again.
    """
    from airflow.sdk.exceptions import AirflowFailException

    from pipeline.config import get_settings, is_valid_tenant_id
    from pipeline.release.format import ReleaseError
    from pipeline.release.rollback import RollbackError, pin, rollback, unpin

    mask_secrets()
    params = context.get("params") or {}
    action, tenant = params.get("action"), str(params.get("tenant") or "")
    if not is_valid_tenant_id(tenant):
        raise AirflowFailException(f"invalid tenant id {tenant!r}")
    run = context.get("dag_run")
    who = getattr(run, "triggering_user_name", None) or getattr(run, "run_id", None) or "unknown"
    by, reason = f"airflow:{who}", str(params.get("reason") or "")
    try:
        if action == "rollback":
            return rollback(get_settings(), tenant, params.get("to") or None, reason=reason, by=by)
        if action == "pin":
            return pin(get_settings(), tenant, reason=reason, by=by)
        if action == "unpin":
            return unpin(get_settings(), tenant, by=by)
    except (RollbackError, ReleaseError) as exc:
        raise AirflowFailException(str(exc)) from exc
    raise AirflowFailException(f"unknown action {action!r}: rollback, pin or unpin")


def experiment_reports(tenant: str, day_end: datetime) -> dict[str, Any]:
    """The experiments DAG's task: every experiment of the tenant reported up to the interval's end
    (stored per day under tenants/{t}/experiments/, logged to MLflow)."""
    from pipeline.config import get_settings, load_tenant
    from pipeline.experiments import report
    from pipeline.storage import open_store

    s = get_settings()
    cfg = load_tenant(tenant, s.tenants_dir)
    return report.run(open_store(s.artifact_root), cfg, day_end, s.mlflow_tracking_uri)
