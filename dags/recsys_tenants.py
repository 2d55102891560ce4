"""One DAG per tenant config (include/tenants/*.yaml): `recsys_{tenant}`. Wiring only.

Every task is one call into `pipeline.stages`; tasks pass no data (stages read the run's
artifacts), only ordering. A tenant file that does not validate becomes a one-task DAG
that fails with the file, field and reason, so the other tenants keep loading.
"""

from __future__ import annotations

import logging
import re
from datetime import timedelta
from pathlib import Path

from airflow.sdk import CronDataIntervalTimetable, dag, get_parsing_context, task

from pipeline.config import TenantConfigError, get_settings, load_tenant_file, tenant_files
from pipeline.stages import STAGES

log = logging.getLogger(__name__)

DEFAULT_ARGS = {
    "owner": "recsys",
    "retries": 2,
    "retry_delay": timedelta(minutes=1),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=30),
    "execution_timeout": timedelta(hours=2),
}


def run_stage(stage: str, tenant_file: str, **context) -> dict:
    """Task body: the Airflow context becomes a RunContext; outcomes map to Airflow states."""
    from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

    from pipeline.context import RunContext, StageError
    from pipeline.stages import GateRejected
    from pipeline.stages import run_stage as run
    from pipeline.validate import ValidationFailed

    end = context.get("data_interval_end") or context.get("logical_date") or context["dag_run"].run_after
    start = context.get("data_interval_start")
    ctx = RunContext(config=load_tenant_file(tenant_file), interval_end=end, interval_start=start)
    try:
        return run(stage, ctx)
    except GateRejected as exc:
        raise AirflowSkipException(f"gate rejected the model: {exc}") from exc
    except (StageError, ValidationFailed, TenantConfigError) as exc:
        raise AirflowFailException(str(exc)) from exc  # bad input: retrying will not help


def build_tenant_dag(path: Path, cfg) -> None:
    @dag(
        dag_id=f"recsys_{cfg.tenant}",
        schedule=CronDataIntervalTimetable(cfg.schedule, timezone="UTC"),
        start_date=cfg.start_date,
        catchup=False,
        max_active_runs=1,
        default_args=DEFAULT_ARGS,
        tags=["recsys", f"tenant:{cfg.tenant}"],
        doc_md=f"Recommendation pipeline of tenant **{cfg.tenant}** (`{path.name}`).\n\n"
        f"```json\n{cfg.model_dump_json(indent=2)}\n```",
    )
    def tenant_pipeline():
        previous = None
        for stage in STAGES:
            current = task(run_stage, task_id=stage)(stage=stage, tenant_file=str(path))
            if previous is not None:
                previous >> current
            previous = current

    tenant_pipeline()


def build_error_dag(path: Path, error: str) -> None:
    @dag(
        dag_id=f"recsys_{re.sub(r'[^a-zA-Z0-9_.-]', '_', path.stem)}",
        schedule=None,
        catchup=False,
        tags=["recsys", "config-error"],
        doc_md=f"**Invalid tenant config**\n\n```\n{error}\n```",
    )
    def broken_tenant():
        @task(task_id="config_error", retries=0)
        def config_error() -> None:
            from airflow.sdk.exceptions import AirflowFailException

            raise AirflowFailException(error)

        config_error()

    broken_tenant()


_current = get_parsing_context().dag_id
for _path in tenant_files(get_settings().tenants_dir):
    if _current and _current != f"recsys_{_path.stem}":
        continue  # a worker parses only the DAG it runs
    try:
        _cfg = load_tenant_file(_path, expect_name_match=True)
    except TenantConfigError as _exc:
        log.error("%s", _exc)
        build_error_dag(_path, str(_exc))
        continue
    build_tenant_dag(_path, _cfg)
