"""Airflow plugin: the per-tenant recsys dashboard inside the Airflow UI. Registration only.

The app (pipeline.ops.dashboard) is mounted on Airflow's API server under /recsys, behind
Airflow's own authentication (the UI's JWT cookie or a bearer token); rolling a tenant back
needs edit permission on that tenant's DAG. The nav entry and the per-DAG link open it in
the UI (iframe).
"""

from __future__ import annotations

from airflow.api_fastapi.core_api.security import get_user
from airflow.plugins_manager import AirflowPlugin
from fastapi import Depends, HTTPException, Request

from pipeline.ops.dashboard import create_dashboard

URL_PREFIX = "/recsys"


def can_edit_tenant_dag(request: Request, user=Depends(get_user)) -> None:
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import DagDetails

    dag_id = f"recsys_{request.path_params.get('tenant', '')}"
    if not get_auth_manager().is_authorized_dag(method="PUT", details=DagDetails(id=dag_id), user=user):
        raise HTTPException(403, f"rolling back needs edit permission on DAG {dag_id}")


dashboard = create_dashboard(
    dependencies=[Depends(get_user)], rollback_dependencies=[Depends(can_edit_tenant_dag)], base_path=URL_PREFIX
)


class RecsysPlugin(AirflowPlugin):
    name = "recsys"
    fastapi_apps = [{"app": dashboard, "url_prefix": URL_PREFIX, "name": "Recsys tenants"}]
    external_views = [
        {"name": "Recsys tenants", "href": "recsys/", "destination": "nav", "url_route": "recsys"},
        {
            "name": "Tenant dashboard",
            "href": "recsys/dag/{DAG_ID}",
            "destination": "dag",
            "url_route": "recsys_tenant",
        },
    ]
