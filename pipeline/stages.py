"""The stage chain, in order: what the DAG wires as tasks and `python -m pipeline run` calls.

Each stage is a module with a function `stage(ctx) -> small dict` (safe for XCom) and an
`IO` naming the run artifacts it reads and writes (pipeline/storage/paths.py). Stages pass
no data, only ordering: each reads its inputs from the artifact store under the same run.
`run_stage` gives the stage a context scoped to its IO, and the run's config snapshot.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # keep `import pipeline.stages` free of pandas/torch for DAG parsing
    from pipeline.context import RunContext, StageIO

log = logging.getLogger(__name__)

StageFn = Callable[["RunContext"], dict[str, Any]]

# stage -> the module that runs it (a function of the stage's name, and `IO`)
STAGE_MODULES: dict[str, str] = {
    "extract": "pipeline.data.extract",
    "validate": "pipeline.validation.stage",
    "features": "pipeline.features.stage",
    "select": "pipeline.training.select",
    "train": "pipeline.training.train",
    "evaluate": "pipeline.evaluation.evaluate",
    "gate": "pipeline.gate.stage",
    "refit": "pipeline.training.refit",
    "index": "pipeline.index.build",
    "publish": "pipeline.release.publish",
    "refresh": "pipeline.release.refresh",
}
STAGES: tuple[str, ...] = tuple(STAGE_MODULES)


class GateRejected(Exception):
    """The gate decided not to publish: the run ends 'skipped', not failed (raised by the gate)."""

    def __init__(self, decision: dict[str, Any]) -> None:
        super().__init__(decision.get("reason", "rejected by the gate"))
        self.decision = decision


def stage(name: str) -> tuple[StageFn, StageIO]:
    """The stage's function and declared IO (its module is imported here, on use)."""
    if name not in STAGE_MODULES:
        raise KeyError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    module = importlib.import_module(STAGE_MODULES[name])
    return getattr(module, name), module.IO


def _run_config(name: str, ctx: RunContext) -> Any:
    """The tenant config this stage runs with: the first stage snapshots the file's config for
    the run; every later stage reads that snapshot, so a YAML edited mid-run cannot mix configs."""
    from pipeline.config import TenantConfig
    from pipeline.storage import codecs, paths

    key = ctx.key(paths.RUN_CONFIG)
    if name == STAGES[0]:
        ctx.store.put(key, codecs.json_bytes(ctx.config.model_dump(mode="json")))
        return ctx.config
    if not ctx.store.exists(key):
        raise ctx.error(
            name, f"no run config snapshot at {ctx.store.uri(key)}: run {STAGES[0]} for this interval first"
        )
    return TenantConfig.model_validate(codecs.read_json(ctx.store.get(key)))


def run_stage(name: str, ctx: RunContext) -> dict[str, Any]:
    """Run one stage under the interval's lease; the gate raises GateRejected when it says no.

    The lease (pipeline/storage/lease.py) fences the run: a second copy of the interval fails
    here with LeaseHeld, and a copy taken over fails at its next write with LeaseLost. The
    last stage and a rejection end the run and release it."""
    from pipeline.ops import cost as costs

    fn, io = stage(name)
    fenced, lease = ctx.take_lease(name)
    with lease.heartbeat():
        try:
            with costs.measure() as spent:
                result = fn(fenced.scoped(name, io, _run_config(name, fenced)))
        except GateRejected:
            _record_cost(fenced, name, spent)
            _log_run_costs(fenced)
            lease.release()
            raise
        _record_cost(fenced, name, spent)
    if name == STAGES[-1]:
        _log_run_costs(fenced)
        lease.release()
    return result


def _record_cost(ctx: RunContext, name: str, cost: dict[str, Any]) -> None:
    """Add `cost` (pipeline/ops/cost.py) to the stage's result.json; the XCom result stays as the
    stage returned it, so a rerun returns the same dict."""
    recorded = ctx.read_result(name)
    if recorded is not None:
        ctx.write_result(name, {**recorded, "cost": cost})
    log.info(
        "stage %s: cost %.2f CPU s, %.2f s wall, peak RSS %.1f MB (tenant %s, run %s)",
        name,
        cost["cpu_s"],
        cost["wall_s"],
        cost["peak_rss_mb"],
        ctx.tenant,
        ctx.run_id,
    )


def _log_run_costs(ctx: RunContext) -> None:
    """At the run's end, every stage's cost goes to MLflow, into the run of the model the run
    produced (refit's, or train's when the gate rejected it). MLflow down never fails the run:
    result.json keeps the costs."""
    from pipeline.ops import tracking

    results = {s: ctx.read_result(s) for s in STAGES}
    runs = [r.get("mlflow_run_id") for s in ("refit", "train") if (r := results[s])]
    target = next((run for run in runs if run), None)
    spent = {s: r["cost"] for s, r in results.items() if r and isinstance(r.get("cost"), dict)}
    if target is None or not spent:
        return
    try:
        tracking.log_metrics(ctx, target, tracking.cost_metrics(spent))
    except Exception as exc:  # noqa: BLE001 - bookkeeping; the stage's outputs are written
        log.warning("could not log stage costs of %s/%s to MLflow: %s", ctx.tenant, ctx.run_id, exc)


def run_all(ctx: RunContext, until: str | None = None) -> dict[str, dict[str, Any]]:
    """Every stage in order, in this process. Raises GateRejected or the failing stage's error
    (after releasing the interval's lease: the run is over; another copy's lease is kept)."""
    from pipeline.storage.lease import LeaseHeld

    results: dict[str, dict[str, Any]] = {}
    for name in STAGES:
        log.info("stage %s: start (tenant %s, run %s)", name, ctx.tenant, ctx.run_id)
        try:
            results[name] = run_stage(name, ctx)
        except LeaseHeld:
            raise
        except Exception:
            ctx.release_lease()
            raise
        if name == until:
            break
    return results
