"""Airflow plugin: the recsys dashboard inside the Airflow UI. Registration and Airflow glue only.

The app (pipeline.ops.dashboard) is mounted on Airflow's API server under /recsys, behind
Airflow's own authentication (the UI's JWT cookie or a bearer token). External views put it
in Airflow's navigation (Browse > Recsys tenants) and on every DAG page (Tenant dashboard),
rendered in the UI's frame (`url_route`). Rollback, pin and unpin need edit permission on the
tenant's DAG and are recorded with the Airflow user's name; the fleet view shows Airflow's
state of each tenant DAG's latest run beside what the artifact store says.
"""

from __future__ import annotations

import logging
from typing import Any

from airflow.api_fastapi.core_api.security import get_user
from airflow.plugins_manager import AirflowPlugin
from fastapi import Depends, HTTPException, Request

from pipeline.ops.dashboard import create_dashboard

URL_PREFIX = "/recsys"
log = logging.getLogger(__name__)


def can_edit_tenant_dag(request: Request, user=Depends(get_user)) -> None:
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import DagDetails

    dag_id = f"recsys_{request.path_params.get('tenant', '')}"
    if not get_auth_manager().is_authorized_dag(method="PUT", details=DagDetails(id=dag_id), user=user):
        raise HTTPException(403, f"this action needs edit permission on DAG {dag_id}")


def airflow_user(user=Depends(get_user)) -> str:
    return f"airflow:{user.get_name()}"


def latest_runs(dag_ids: list[str]) -> dict[str, dict[str, Any]]:
    """Each DAG's newest run (by run_after) from Airflow's metadata DB; {} if it cannot be read."""
    try:
        from airflow.models.dagrun import DagRun
        from airflow.utils.session import create_session
        from sqlalchemy import func, select

        newest = (
            select(DagRun.dag_id, func.max(DagRun.run_after).label("run_after"))
            .where(DagRun.dag_id.in_(dag_ids))
            .group_by(DagRun.dag_id)
            .subquery()
        )
        query = select(DagRun).join(
            newest, (DagRun.dag_id == newest.c.dag_id) & (DagRun.run_after == newest.c.run_after)
        )
        with create_session() as session:
            return {
                r.dag_id: {
                    "run_id": r.run_id,
                    "state": str(r.state),
                    "run_type": str(r.run_type),
                    "start_date": r.start_date.isoformat() if r.start_date else None,
                    "end_date": r.end_date.isoformat() if r.end_date else None,
                }
                for r in session.scalars(query)
            }
    except Exception:  # the page still shows what the artifact store says
        log.exception("recsys dashboard: cannot read the DAG runs")
        return {}


dashboard = create_dashboard(
    dependencies=[Depends(get_user)],
    rollback_dependencies=[Depends(can_edit_tenant_dag)],
    base_path=URL_PREFIX,
    airflow_runs=latest_runs,
    actor=airflow_user,
)


class RecsysPlugin(AirflowPlugin):
    name = "recsys"
    fastapi_apps = [{"app": dashboard, "url_prefix": URL_PREFIX, "name": "Recsys tenants"}]
    external_views = [
        {
            "name": "Recsys tenants",
            "href": "recsys/",
            "destination": "nav",
            "category": "browse",
            "url_route": "recsys",
        },
        {
            "name": "Tenant dashboard",
            "href": "recsys/dag/{DAG_ID}",
            "destination": "dag",
            "url_route": "recsys_tenant",
        },
    ]
