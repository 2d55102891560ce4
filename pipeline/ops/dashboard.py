"""The recsys dashboard: a fleet view of every tenant and a view per tenant, with actions.

Fleet (`/`): each tenant's newest run status, data freshness, live release age, last gate
verdict, validation warnings and run cost; failures and stale tenants first, sortable and
filterable in the page. Tenant (`/tenants/{t}`): every metric over releases beside popularity,
data volume and validation per day, stage durations, the gate's checks with their evidence,
the diff between two releases, and rollback / pin / unpin (pipeline/ops/fleet.py and
release_diff.py gather the data; this module only serves it).

A plain FastAPI app with server-rendered HTML: the Airflow plugin in plugins/ mounts it under
/recsys with Airflow's authentication and shows it in Airflow's navigation (external views);
it runs standalone too. Charts are drawn by Chart.js, vendored in static/ (no CDN, no build
step). Templates are Jinja2 with autoescape; page data travels as escaped JSON. Actions are
JSON POSTs that need a custom header naming the action, so a cross-site form cannot send
them (CSRF); the plugin adds Airflow's per-DAG edit permission check.
"""

from __future__ import annotations

import mimetypes
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from importlib import resources
from typing import Any

import jinja2
from fastapi import Depends, FastAPI, Header, HTTPException, Path, Query
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import BaseModel, ConfigDict

from pipeline.config import TENANT_ID_PATTERN, Settings, TenantConfig, get_settings, load_tenant
from pipeline.ops.maintenance import blocking_failures

# pipeline.release.format/storage (numpy, pandas, pyarrow) are imported inside functions: Airflow
# loads plugins in its components, and this module must stay cheap to import there.

TenantId = Path(pattern=TENANT_ID_PATTERN)
RELEASE_ID = r"^\d{8}T\d{6}Z-[0-9a-f]+$"  # a fresh Query() per parameter: FastAPI sets its alias in place
STATIC = ("chart.umd.min.js", "dashboard.js", "dashboard.css")
ACTIONS = ("rollback", "pin", "unpin")
PERMISSION = "edit permission on the tenant's DAG (Airflow: DAG PUT; SimpleAuthManager role user or above)"
SEGMENT_METRICS = ("users", "ndcg@10", "recall@10", "coverage", "diversity@10", "novelty@10")


def tenant_overview(store, cfg: TenantConfig) -> dict[str, Any]:
    """The tenant's releases (every metric, model and popularity), last gate and validation."""
    from pipeline.release import format as release
    from pipeline.storage import codecs, paths

    t = cfg.tenant
    pointer = release.read_pointer(store, t)
    history = []
    segments: dict[str, Any] = {}  # the live release's metrics per user segment
    for rid in release.list_releases(store, t):
        m = release.read_manifest(store, t, rid)
        if pointer and rid == pointer[0].get("release_id"):
            segments = m.get("segments") or {}
        model = m.get("model", "")
        metrics = m.get("metrics", {})
        history.append(
            {
                "release_id": rid,
                "data_interval_end": m.get("data_interval_end"),
                "model": model,
                "metrics": metrics.get(model, {}),
                "popularity": metrics.get("popularity", {}),
                "gate": (m.get("gate") or {}).get("reason"),
            }
        )
    keys = store.list(paths.runs_prefix(t))
    gate = None
    if runs := paths.runs_with(keys, t, paths.DECISION):
        gate = {"run_id": runs[-1], **codecs.read_json(store.get(paths.DECISION.key(t, runs[-1])))}
    validation = None
    if runs := paths.runs_with(keys, t, paths.VALIDATION_REPORT):
        report = codecs.read_json(store.get(paths.VALIDATION_REPORT.key(t, runs[-1])))
        key = report.get("data_docs_key") or ""
        prefix = paths.DATA_DOCS.key(t, runs[-1])
        validation = {
            "run_id": runs[-1],
            "success": report["success"],
            "rows": report["rows"],
            "interval_events": (report.get("interval") or {}).get("events"),
            "duplicate_rows": report["duplicate_rows"],
            "failed": blocking_failures(report),
            "warnings": report.get("warnings", []),
            "data_docs_path": key[len(prefix) :] if key.startswith(prefix) else None,
        }
    return {
        "tenant": t,
        "live": pointer[0] if pointer else None,
        "releases": history,
        "metric_names": sorted({k for h in history for k in h["metrics"]}),
        "segments": segments,
        "gate": gate,
        "validation": validation,
    }


_TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("pipeline.ops", "templates"), autoescape=True, trim_blocks=True, lstrip_blocks=True
)


def _render(name: str, **values: Any) -> HTMLResponse:
    return HTMLResponse(_TEMPLATES.get_template(name).render(**values))


class ActionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    release_id: str | None = None  # rollback: the target (default: the previous release)
    reason: str = ""


def _default_actor() -> str:
    return "airflow-ui"


def create_dashboard(
    settings_provider: Callable[[], Settings] = get_settings,
    dependencies: Sequence[Any] = (),
    rollback_dependencies: Sequence[Any] = (),
    base_path: str = "",
    airflow_runs: Callable[[list[str]], dict[str, dict[str, Any]]] | None = None,
    actor: Callable[..., str] = _default_actor,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> FastAPI:
    """`dependencies` guard every route (the plugin passes Airflow's authentication);
    `rollback_dependencies` guard the actions (the plugin: edit permission on the tenant's DAG);
    `airflow_runs(dag_ids)` gives each DAG's latest Airflow run (state, run_id, dates) when the
    app runs inside Airflow; `actor` names who acts (a FastAPI dependency)."""
    app = FastAPI(title="recsys tenants", dependencies=list(dependencies), docs_url=None, redoc_url=None)

    def store():
        from pipeline.storage import open_store

        return open_store(settings_provider().artifact_root)

    def config(tenant: str) -> TenantConfig:
        try:
            return load_tenant(tenant, settings_provider().tenants_dir)
        except Exception:
            raise HTTPException(404, f"unknown tenant {tenant!r}") from None

    def fleet_rows() -> list[dict[str, Any]]:
        from pipeline.ops import fleet
        from pipeline.ops.maintenance import load_configs

        s, now = store(), clock()
        configs, broken = load_configs(settings_provider())
        states = airflow_runs([f"recsys_{c.tenant}" for c in configs]) if airflow_runs else {}
        rows = [fleet.fleet_row(s, c, now, states.get(f"recsys_{c.tenant}")) for c in configs]
        return fleet.fleet(rows + [fleet.broken_row(name, why) for name, why in broken.items()])

    def detail(tenant: str, old: str | None, new: str | None) -> dict[str, Any]:
        from pipeline.ops import fleet
        from pipeline.ops.release_diff import release_diff

        cfg, s = config(tenant), store()
        o = tenant_overview(s, cfg)
        o["runs"] = fleet.tenant_history(s, tenant, clock())
        ids = [r["release_id"] for r in o["releases"]]
        live = (o["live"] or {}).get("release_id")
        new = new or live or (ids[-1] if ids else None)
        if old is None and new in ids and ids.index(new) > 0:
            old = ids[ids.index(new) - 1]
        for rid in (old, new):
            if rid is not None and rid not in ids:
                raise HTTPException(404, f"tenant {tenant} has no release {rid}")
        o["diff"] = release_diff(s, tenant, old, new) if old and new and old != new else None
        return o

    @app.get("/", response_class=HTMLResponse)
    def index() -> HTMLResponse:
        return _render("index.html", tenants=fleet_rows(), base=base_path)

    @app.get("/api/fleet")
    def fleet_json() -> list[dict[str, Any]]:
        return fleet_rows()

    @app.get("/static/{name}")
    def static(name: str) -> Response:
        if name not in STATIC:
            raise HTTPException(404, "not found")
        data = resources.files("pipeline.ops").joinpath("static", name).read_bytes()
        media = mimetypes.guess_type(name)[0] or "application/octet-stream"
        return Response(data, media_type=media, headers={"Cache-Control": "max-age=3600"})

    @app.get("/dag/{dag_id}")
    def from_dag(dag_id: str) -> RedirectResponse:
        """Target of the per-DAG link in the Airflow UI: recsys_<tenant>[_export] -> the tenant page."""
        tenant = dag_id.removeprefix("recsys_").removesuffix("_export")
        config(tenant)
        return RedirectResponse(f"{base_path}/tenants/{tenant}")

    @app.get("/tenants/{tenant}", response_class=HTMLResponse)
    def tenant_page(
        tenant: str = TenantId,
        old: str | None = Query(None, pattern=RELEASE_ID),
        new: str | None = Query(None, pattern=RELEASE_ID),
    ) -> HTMLResponse:
        o = detail(tenant, old, new)
        return _render("tenant.html", o=o, base=base_path, permission=PERMISSION, segment_metrics=SEGMENT_METRICS)

    @app.get("/api/tenants/{tenant}")
    def tenant_json(
        tenant: str = TenantId,
        old: str | None = Query(None, pattern=RELEASE_ID),
        new: str | None = Query(None, pattern=RELEASE_ID),
    ) -> dict[str, Any]:
        return detail(tenant, old, new)

    @app.get("/tenants/{tenant}/runs/{run_id}/data_docs/{path:path}")
    def data_docs(path: str, tenant: str = TenantId, run_id: str = Path(pattern=r"^\d{8}T\d{6}Z$")) -> Response:
        config(tenant)
        if ".." in path.split("/") or path.startswith("/"):
            raise HTTPException(404, "not found")
        from pipeline.storage import paths

        key = paths.DATA_DOCS.key(tenant, run_id, path)
        s = store()
        if not s.exists(key):
            raise HTTPException(404, "not found")
        return Response(s.get(key), media_type=mimetypes.guess_type(path)[0] or "application/octet-stream")

    @app.post("/api/tenants/{tenant}/{action}", dependencies=list(rollback_dependencies))
    def act(
        action: str,
        body: ActionRequest | None = None,
        tenant: str = TenantId,
        x_recsys_action: str | None = Header(default=None),
        by: str = Depends(actor),
    ) -> dict[str, Any]:
        """rollback (pins the tenant), pin, unpin: the CLI's code, recorded with who acted."""
        if action not in ACTIONS:
            raise HTTPException(404, f"unknown action {action!r}; actions: {', '.join(ACTIONS)}")
        if x_recsys_action != action:
            raise HTTPException(403, f"missing X-Recsys-Action: {action} header")
        from pipeline.release import format as release
        from pipeline.release import rollback as moves

        config(tenant)
        body = body or ActionRequest()
        try:
            if action == "rollback":
                return moves.rollback(settings_provider(), tenant, body.release_id, reason=body.reason, by=by)
            if action == "pin":
                return moves.pin(settings_provider(), tenant, reason=body.reason, by=by)
            return moves.unpin(settings_provider(), tenant, by=by)
        except (moves.RollbackError, release.ReleaseError) as exc:
            raise HTTPException(409, str(exc)) from None

    from pipeline.ops import experiments_view  # the experiments section: its own page, JSON and promote action

    experiments_view.add_routes(app, store, config, settings_provider, _render, rollback_dependencies, base_path)
    return app
