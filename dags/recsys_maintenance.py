"""Nightly maintenance across tenants: retention per tenant (mapped), then a data-quality summary.

Wiring only: the work is in `pipeline.ops.maintenance`.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from airflow.sdk import CronDataIntervalTimetable, dag, task

from pipeline.airflow_tasks import on_failure


@dag(
    dag_id="recsys_maintenance",
    schedule=CronDataIntervalTimetable("30 4 * * *", timezone="UTC"),
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    default_args={
        "owner": "recsys",
        "retries": 1,
        "retry_delay": timedelta(minutes=5),
        "on_failure_callback": on_failure,
    },
    tags=["recsys", "maintenance"],
    doc_md="Applies each tenant's `retention` (run folders, releases, Redis versions) and writes "
    "`reports/data_quality/<day>.json` with every tenant's latest validation result.",
)
def recsys_maintenance():
    @task
    def tenants() -> list[str]:
        from pipeline.config import get_settings
        from pipeline.ops.maintenance import valid_configs

        return [c.tenant for c in valid_configs(get_settings())]

    @task(map_index_template="{{ task.op_kwargs['tenant'] }}", execution_timeout=timedelta(hours=1))
    def retention(tenant: str) -> dict:
        from pipeline.airflow_tasks import apply_retention

        return apply_retention(tenant)

    @task(execution_timeout=timedelta(minutes=30))
    def quality_summary(**context) -> dict:
        from pipeline.airflow_tasks import quality_summary as summarize

        return summarize(context["data_interval_end"])

    names = tenants()
    retention.expand(tenant=names) >> quality_summary()


recsys_maintenance()
