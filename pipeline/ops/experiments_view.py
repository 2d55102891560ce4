"""The dashboard's experiments section: per experiment its arms, the latest report (per arm
users, impressions, clicks, CTR and conversion with CIs, lift, verdict, the SRM check), a plot
per metric over the daily reports, the promotions made, and a promote button per arm.

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
COLOURS = ("#1f6feb", "#cf222e", "#1a7f37", "#8250df", "#bf8700", "#0a7e8c")
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


def series_svg(name: str, label: str, arms: dict[str, list[list[Any]]], width: int = 560, height: int = 200) -> str:
    """One metric over days, a line per arm with its 95% interval as a band (inline SVG, no JS)."""
    values = [v for pts in arms.values() for p in pts for v in p[1:] if v is not None]
    days = sorted({p[0] for pts in arms.values() for p in pts})
    if not values or not days:
        return f"<p>No {label} reports yet.</p>"
    top = max(values) * 1.1 or 1.0
    pad, n = 40, max(len(days) - 1, 1)
    x = {d: pad + i * (width - 2 * pad) / n for i, d in enumerate(days)}

    def y(v: float) -> float:
        return height - pad - v / top * (height - 2 * pad)

    parts = [
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#999"/>',
        f'<text x="{pad - 4}" y="{pad + 4}" text-anchor="end" font-size="10">{100 * top:.1f}%</text>',
        f'<text x="{pad}" y="{height - 8}" font-size="10">{days[0]}</text>',
        f'<text x="{width - pad}" y="{height - 8}" text-anchor="end" font-size="10">{days[-1]}</text>',
    ]
    for i, (arm, pts) in enumerate(sorted(arms.items())):
        c = COLOURS[i % len(COLOURS)]
        band = [p for p in pts if p[2] is not None and p[3] is not None]
        if len(band) > 1:
            poly = [f"{x[p[0]]:.1f},{y(p[3]):.1f}" for p in band] + [f"{x[p[0]]:.1f},{y(p[2]):.1f}" for p in band[::-1]]
            parts.append(f'<polygon points="{" ".join(poly)}" fill="{c}" fill-opacity="0.12" stroke="none"/>')
        line = [(x[p[0]], y(p[1])) for p in pts if p[1] is not None]
        if line:
            coords = " ".join(f"{a:.1f},{b:.1f}" for a, b in line)
            parts.append(f'<polyline fill="none" stroke="{c}" stroke-width="2" points="{coords}"/>')
            parts += [f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="{c}"/>' for a, b in line]
            parts.append(
                f'<text x="{line[-1][0] - 4:.1f}" y="{line[-1][1] - 6:.1f}" fill="{c}" text-anchor="end">{arm}</text>'
            )
    return (
        f'<svg class="experiment-plot" id="plot-{name}" role="img" aria-label="{label} per arm over days" '
        f'width="{width}" height="{height}" font-family="sans-serif" font-size="12">{"".join(parts)}</svg>'
    )


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
        plots = {
            e["name"]: [series_svg(f"{e['name']}-{m}", label, e["series"][m]) for m, label in PLOTTED]
            for e in o["experiments"]
        }
        return render("experiments.html", o=o, plots=plots, base=base_path)

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
