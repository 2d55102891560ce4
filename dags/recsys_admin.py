"""Manual release operations from the Airflow UI: rollback, pin, unpin (Trigger DAG -> form).

Wiring only: the work is in `pipeline.release.rollback` (the same functions as
`python -m pipeline rollback | pin | unpin`). Never scheduled, never retried: each run is one
person's decision, recorded with who triggered it.
"""

from __future__ import annotations

from datetime import UTC, datetime

from airflow.sdk import Param, dag, task

from pipeline.airflow_tasks import on_failure


@dag(
    dag_id="recsys_admin",
    schedule=None,
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    default_args={"owner": "recsys", "retries": 0, "on_failure_callback": on_failure},
    tags=["recsys", "admin"],
    params={
        "action": Param(
            "rollback",
            type="string",
            enum=["rollback", "pin", "unpin"],
            description="rollback: make an earlier release live, pin the tenant, blocklist the bad release; "
            "pin: hold the live release; unpin: let newer releases go live again",
        ),
        "tenant": Param("", type="string", minLength=1, description="tenant id"),
        "to": Param(
            None, type=["null", "string"], description="rollback only: release id (default: the previous release)"
        ),
        "reason": Param("", type="string", description="why (recorded in the pointer and pin.json)"),
    },
    doc_md="Rollback / pin / unpin one tenant's release pointer. Trigger with the form: the run's "
    "result (XCom) is what `python -m pipeline rollback|pin|unpin` prints.",
)
def recsys_admin():
    @task
    def release_action(**context) -> dict:
        from pipeline.airflow_tasks import release_action as act

        return act(**context)

    release_action()


recsys_admin()
