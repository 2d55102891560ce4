"""Daily experiment reports: one mapped task per tenant that runs experiments.

Wiring only: the work is in `pipeline.experiments.report` (via `pipeline.airflow_tasks`).
Each report covers the tenant's impressions and attributed outcomes up to the data interval's
end, is stored under `tenants/{t}/experiments/{name}/reports/{day}.json` (the dashboard plots
the series) and logged to MLflow.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from airflow.sdk import CronDataIntervalTimetable, dag, task

from pipeline.airflow_tasks import on_failure


@dag(
    dag_id="recsys_experiments",
    schedule=CronDataIntervalTimetable("15 0 * * *", timezone="UTC"),
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    default_args={
        "owner": "recsys",
        "retries": 2,
        "retry_delay": timedelta(minutes=5),
        "on_failure_callback": on_failure,
    },
    tags=["recsys", "experiments"],
    doc_md="Per tenant with `experiments:` (or a challenger), the daily report of each experiment: per arm "
    "users, impressions, clicks, CTR and conversion with 95% CIs, lift vs control, SRM check, verdict.",
)
def recsys_experiments():
    @task
    def tenants() -> list[str]:
        from pipeline.config import get_settings
        from pipeline.ops.maintenance import valid_configs

        return [c.tenant for c in valid_configs(get_settings()) if c.live_experiments()]

    @task(map_index_template="{{ task.op_kwargs['tenant'] }}", execution_timeout=timedelta(hours=1))
    def report(tenant: str, **context) -> dict:
        from pipeline.airflow_tasks import experiment_reports

        return experiment_reports(tenant, context["data_interval_end"])

    report.expand(tenant=tenants())


recsys_experiments()
