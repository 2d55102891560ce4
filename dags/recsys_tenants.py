"""One DAG per tenant config (include/tenants/*.yaml): `recsys_{tenant}`, plus its export DAG.

Wiring only: every task is one call into `pipeline.airflow_tasks`, which runs a stage of
`pipeline.stages`. Tasks pass no data (stages read the run's artifacts), only ordering.
`publish` emits the tenant's release Asset; `recsys_{tenant}_export` is scheduled on it.
A tenant file that does not validate becomes a one-task DAG that fails with the file,
field and reason, so the other tenants keep loading.
"""

from __future__ import annotations

import logging
import re
from datetime import timedelta
from pathlib import Path

from airflow.sdk import Asset, CronDataIntervalTimetable, dag, get_parsing_context, task

from pipeline.airflow_tasks import (
    TIMEOUT_MINUTES,
    TRAINING_STAGES,
    export_release,
    on_failure,
    release_asset_uri,
    run_stage,
)
from pipeline.config import TenantConfigError, get_settings, load_tenant_file, tenant_files
from pipeline.stages import STAGES

log = logging.getLogger(__name__)

DEFAULT_ARGS = {
    "owner": "recsys",
    "retries": 2,
    "retry_delay": timedelta(minutes=1),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=30),
    "on_failure_callback": on_failure,
}


def release_asset(tenant: str) -> Asset:
    return Asset(name=f"recsys_{tenant}_release", uri=release_asset_uri(tenant), group="recsys")


def build_tenant_dags(path: Path, cfg) -> None:
    asset = release_asset(cfg.tenant)

    @dag(
        dag_id=f"recsys_{cfg.tenant}",
        schedule=CronDataIntervalTimetable(cfg.schedule, timezone="UTC"),
        start_date=cfg.start_date,
        catchup=False,
        max_active_runs=1,
        default_args=DEFAULT_ARGS,
        tags=["recsys", f"tenant:{cfg.tenant}", *(f"model:{k}" for k in cfg.model_kinds())],
        doc_md=f"Recommendation pipeline of tenant **{cfg.tenant}** (`{path.name}`), effective config:\n\n"
        f"```json\n{cfg.model_dump_json(indent=2)}\n```",
    )
    def tenant_pipeline():
        previous = None
        for stage in STAGES:
            options = {"task_id": stage, "execution_timeout": timedelta(minutes=TIMEOUT_MINUTES[stage])}
            if stage in TRAINING_STAGES:
                options |= {"pool": cfg.training.pool, "queue": cfg.training.queue_for(*cfg.model_kinds())}
            if stage == "publish":
                options["outlets"] = [asset]
            current = task(run_stage, **options)(stage=stage, tenant_file=str(path))
            if previous is not None:
                previous >> current
            previous = current

    @dag(
        dag_id=f"recsys_{cfg.tenant}_export",
        schedule=[asset],
        start_date=cfg.start_date,
        catchup=False,
        max_active_runs=1,
        default_args=DEFAULT_ARGS,
        tags=["recsys", f"tenant:{cfg.tenant}", "export"],
        doc_md=f"Top-{cfg.export.k} items per user of every release of **{cfg.tenant}**, as Parquet.",
    )
    def tenant_export():
        task(export_release, task_id="export_topk", execution_timeout=timedelta(hours=1))(tenant_file=str(path))

    tenant_pipeline()
    tenant_export()


def build_error_dag(path: Path, error: str) -> None:
    @dag(
        dag_id=f"recsys_{re.sub(r'[^a-zA-Z0-9_.-]', '_', path.stem)}",
        schedule=None,
        catchup=False,
        tags=["recsys", "config-error"],
        doc_md=f"**Invalid tenant config**\n\n```\n{error}\n```",
    )
    def broken_tenant():
        @task(task_id="config_error", retries=0, on_failure_callback=on_failure)
        def config_error() -> None:
            from airflow.sdk.exceptions import AirflowFailException

            raise AirflowFailException(error)

        config_error()

    broken_tenant()


_current = get_parsing_context().dag_id
for _path in tenant_files(get_settings().tenants_dir):
    if _current and _current not in (f"recsys_{_path.stem}", f"recsys_{_path.stem}_export"):
        continue  # a worker parses only the DAG it runs
    try:
        _cfg = load_tenant_file(_path, expect_name_match=True)
    except TenantConfigError as _exc:
        log.error("%s", _exc)
        build_error_dag(_path, str(_exc))
        continue
    build_tenant_dags(_path, _cfg)
