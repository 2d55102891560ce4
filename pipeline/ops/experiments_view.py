"""The dashboard's experiments section: per experiment its arms, the latest report (per arm
users, impressions, clicks, CTR and conversion with CIs, lift, verdict, the SRM check), a chart
per metric over the daily reports (Chart.js, drawn by static/dashboard.js from the page's JSON,
with each arm's 95% interval as a band; a table of the same values for pages without JS), the
promotions made, and a promote button per arm.

Mounted by `dashboard.create_dashboard` (`add_routes`), kept apart so the dashboard's own page
can change without touching it: `/tenants/{t}/experiments` (HTML, the `experiments.html`
partial inside the base layout) and `/api/tenants/{t}/experiments` (the same data as JSON).
Promote is a JSON POST with `X-Recsys-Action: promote` (CSRF, as rollback) behind the same
per-DAG permission check as rollback.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import FastAPI, Header, HTTPException, Path
from fastapi.responses import HTMLResponse
from pydantic import BaseModel

from pipeline.config import TENANT_ID_PATTERN, Settings, TenantConfig

TenantId = Path(pattern=TENANT_ID_PATTERN)
PLOTTED = (("ctr", "CTR"), ("conversion", "Conversion"))


def experiments_overview(store, cfg: TenantConfig) -> dict[str, Any]:
    """Everything the section shows for one tenant, as plain data (also served as JSON)."""
    from pipeline.experiments import report
    from pipeline.experiments.challenger import read_challenger
    from pipeline.storage import paths

    out = []
    for e in cfg.live_experiments():
        reports = report.history(store, cfg.tenant, e.name)
        key = f"{paths.experiment_prefix(cfg.tenant, e.name)}/promotions.json"
        promotions = json.loads(store.get(key))["promotions"] if store.exists(key) else []
        out.append(
            {
                "name": e.name,
                "traffic": e.traffic,
                "offset": e.offset,
                "interleave": e.interleave,
                "control": e.control_arm,
                "arms": [{"name": a.name, "share": a.share, "release": a.release, **a.options()} for a in e.arms],
                "latest": reports[-1] if reports else None,
                "series": series(reports),
                "promotions": promotions,
            }
        )
    return {"tenant": cfg.tenant, "challenger": read_challenger(store, cfg.tenant), "experiments": out}


def series(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Per metric, per arm: [(day, value, low, high)] over the daily reports, oldest first."""
    out: dict[str, dict[str, list[list[Any]]]] = {m: {} for m, _ in PLOTTED}
    for r in reports:
        day = r.get("day") or r["interval_end"][:10]
        for a in r.get("arms", []):
            for m, _ in PLOTTED:
                ci = a.get(f"{m}_ci") or [None, None]
                out[m].setdefault(a["arm"], []).append([day, a.get(m), *ci])
    return out


class PromoteRequest(BaseModel):
    arm: str
    force: bool = False
    reason: str = ""


def add_routes(
    app: FastAPI,
    store: Callable[[], Any],
    config: Callable[[str], TenantConfig],
    settings_provider: Callable[[], Settings],
    render: Callable[..., HTMLResponse],
    action_dependencies: Sequence[Any] = (),
    base_path: str = "",
) -> None:
    """The section's routes on the dashboard app (its store, config loader and renderer)."""

    @app.get("/api/tenants/{tenant}/experiments")
    def experiments_json(tenant: str = TenantId) -> dict[str, Any]:
        return experiments_overview(store(), config(tenant))

    @app.get("/tenants/{tenant}/experiments", response_class=HTMLResponse)
    def experiments_page(tenant: str = TenantId) -> HTMLResponse:
        o = experiments_overview(store(), config(tenant))
        return render("experiments.html", o=o, plotted=PLOTTED, base=base_path)

    @app.post("/api/tenants/{tenant}/experiments/{experiment}/promote", dependencies=list(action_dependencies))
    def promote_action(
        body: PromoteRequest,
        tenant: str = TenantId,
        experiment: str = Path(pattern=r"^[a-z0-9][a-z0-9_-]{0,39}$"),
        x_recsys_action: str | None = Header(default=None),
    ) -> dict[str, Any]:
        if x_recsys_action != "promote":
            raise HTTPException(403, "missing X-Recsys-Action: promote header")
        from pipeline.experiments.promote import PromotionError, promote
        from pipeline.release.format import ReleaseError

        config(tenant)
        try:
            return promote(
                settings_provider(), tenant, experiment, body.arm, reason=body.reason, by="airflow-ui", force=body.force
            )
        except (PromotionError, ReleaseError) as exc:
            raise HTTPException(409, str(exc)) from None
