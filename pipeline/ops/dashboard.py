"""The tenant dashboard: live release, release history (with a metrics plot), the last gate
decision, the last validation (with its Data Docs), and the rollback and unpin actions (a
rollback pins the tenant; the page shows the pin and who set it).

A plain FastAPI app with server-rendered HTML (no JS build, no CDN): the Airflow plugin in
plugins/ mounts it under /recsys with Airflow's own authentication; it runs standalone too.
Templates are Jinja2 with autoescape. Rollback is a JSON POST that needs a custom header, so
a cross-site form cannot trigger it (CSRF), and the plugin adds a per-DAG permission check.
"""

from __future__ import annotations

import mimetypes
from collections.abc import Callable, Sequence
from typing import Any

import jinja2
from fastapi import FastAPI, Header, HTTPException, Path
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import BaseModel

from pipeline.config import TENANT_ID_PATTERN, Settings, TenantConfig, get_settings, load_tenant
from pipeline.ops.maintenance import blocking_failures

# pipeline.release.format/storage (numpy, pandas, pyarrow) are imported inside functions: Airflow
# loads plugins in its components, and this module must stay cheap to import there.

TenantId = Path(pattern=TENANT_ID_PATTERN)
METRICS = ("ndcg@10", "recall@10", "map@10", "coverage", "diversity@10", "novelty@10")
SEGMENT_METRICS = ("users", "ndcg@10", "recall@10", "coverage", "diversity@10", "novelty@10")


def tenant_overview(store, cfg: TenantConfig) -> dict[str, Any]:
    """Everything the dashboard shows for one tenant, as plain data (also served as JSON)."""
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
        history.append(
            {
                "release_id": rid,
                "data_interval_end": m.get("data_interval_end"),
                "model": model,
                "metrics": {k: m.get("metrics", {}).get(model, {}).get(k) for k in METRICS},
                "popularity_ndcg": m.get("metrics", {}).get("popularity", {}).get("ndcg@10"),
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
            "duplicate_rows": report["duplicate_rows"],
            "failed": blocking_failures(report),
            "warnings": report.get("warnings", []),
            "data_docs_path": key[len(prefix) :] if key.startswith(prefix) else None,
        }
    return {
        "tenant": t,
        "live": pointer[0] if pointer else None,
        "releases": history,
        "segments": segments,
        "gate": gate,
        "validation": validation,
    }


def metrics_svg(history: list[dict[str, Any]], width: int = 640, height: int = 220) -> str:
    """A small inline SVG line chart of NDCG@10 per release, model vs popularity."""
    points = [(h["metrics"].get("ndcg@10"), h.get("popularity_ndcg")) for h in history]
    values = [v for pair in points for v in pair if v is not None]
    if not values:
        return "<p>No metrics yet.</p>"
    top = max(values) * 1.1 or 1.0
    pad, n = 36, max(len(points) - 1, 1)
    x = lambda i: pad + i * (width - 2 * pad) / n  # noqa: E731
    y = lambda v: height - pad - v / top * (height - 2 * pad)  # noqa: E731

    def line(idx: int, colour: str, label: str) -> str:
        pts = [(x(i), y(p[idx])) for i, p in enumerate(points) if p[idx] is not None]
        coords = " ".join(f"{a:.1f},{b:.1f}" for a, b in pts)
        dots = "".join(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="{colour}"/>' for a, b in pts)
        return (
            f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{coords}"/>{dots}'
            f'<text x="{width - pad}" y="{pts[-1][1] - 6:.1f}" fill="{colour}" text-anchor="end">{label}</text>'
        )

    axis = (
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#999"/>'
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#999"/>'
        f'<text x="{pad - 4}" y="{pad + 4}" text-anchor="end" font-size="10">{top:.2f}</text>'
        f'<text x="{pad - 4}" y="{height - pad}" text-anchor="end" font-size="10">0</text>'
        f'<text x="{width / 2}" y="{height - 8}" text-anchor="middle" font-size="11">releases (oldest → newest)</text>'
    )
    return (
        f'<svg id="metrics-plot" role="img" aria-label="NDCG@10 over releases" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="12">{axis}{line(0, "#1f6feb", "model ndcg@10")}'
        f"{line(1, '#999', 'popularity')}</svg>"
    )


_TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("pipeline.ops", "templates"), autoescape=True, trim_blocks=True, lstrip_blocks=True
)


def _render(name: str, **values: Any) -> HTMLResponse:
    return HTMLResponse(_TEMPLATES.get_template(name).render(**values))


class RollbackRequest(BaseModel):
    release_id: str | None = None


def create_dashboard(
    settings_provider: Callable[[], Settings] = get_settings,
    dependencies: Sequence[Any] = (),
    rollback_dependencies: Sequence[Any] = (),
    base_path: str = "",
) -> FastAPI:
    """`dependencies` guard every route (the plugin passes Airflow's authentication);
    `rollback_dependencies` guard the rollback action (e.g. a per-tenant DAG edit check)."""
    app = FastAPI(title="recsys tenants", dependencies=list(dependencies), docs_url=None, redoc_url=None)

    def store():
        from pipeline.storage import open_store

        return open_store(settings_provider().artifact_root)

    def config(tenant: str) -> TenantConfig:
        try:
            return load_tenant(tenant, settings_provider().tenants_dir)
        except Exception:
            raise HTTPException(404, f"unknown tenant {tenant!r}") from None

    @app.get("/", response_class=HTMLResponse)
    def index() -> HTMLResponse:
        from pipeline.ops.maintenance import valid_configs

        s = store()
        overviews = [tenant_overview(s, cfg) for cfg in valid_configs(settings_provider())]
        return _render("index.html", tenants=overviews, base=base_path)

    @app.get("/dag/{dag_id}")
    def from_dag(dag_id: str) -> RedirectResponse:
        """Target of the per-DAG link in the Airflow UI: recsys_<tenant>[_export] -> the tenant page."""
        tenant = dag_id.removeprefix("recsys_").removesuffix("_export")
        config(tenant)
        return RedirectResponse(f"{base_path}/tenants/{tenant}")

    @app.get("/tenants/{tenant}", response_class=HTMLResponse)
    def tenant_page(tenant: str = TenantId) -> HTMLResponse:
        o = tenant_overview(store(), config(tenant))
        return _render(
            "tenant.html",
            o=o,
            base=base_path,
            metrics=METRICS,
            segment_metrics=SEGMENT_METRICS,
            svg=metrics_svg(o["releases"]),
        )

    @app.get("/api/tenants/{tenant}")
    def tenant_json(tenant: str = TenantId) -> dict[str, Any]:
        return tenant_overview(store(), config(tenant))

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

    @app.post("/api/tenants/{tenant}/rollback", dependencies=list(rollback_dependencies))
    def rollback_action(
        body: RollbackRequest, tenant: str = TenantId, x_recsys_action: str | None = Header(default=None)
    ) -> dict[str, Any]:
        if x_recsys_action != "rollback":
            raise HTTPException(403, "missing X-Recsys-Action: rollback header")
        from pipeline.release import format as release
        from pipeline.release.rollback import RollbackError, rollback

        config(tenant)
        try:
            return rollback(settings_provider(), tenant, body.release_id, by="airflow-ui")
        except (RollbackError, release.ReleaseError) as exc:
            raise HTTPException(409, str(exc)) from None

    @app.post("/api/tenants/{tenant}/unpin", dependencies=list(rollback_dependencies))
    def unpin_action(tenant: str = TenantId, x_recsys_action: str | None = Header(default=None)) -> dict[str, Any]:
        """Lift a rollback's (or a manual) pin: the next newer release goes live again."""
        if x_recsys_action != "unpin":
            raise HTTPException(403, "missing X-Recsys-Action: unpin header")
        from pipeline.release.rollback import RollbackError, unpin

        config(tenant)
        try:
            return unpin(settings_provider(), tenant, by="airflow-ui")
        except RollbackError as exc:
            raise HTTPException(409, str(exc)) from None

    return app
