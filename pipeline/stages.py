"""The stage chain, in order: what the DAG wires as tasks and `python -m pipeline run` calls.

Each entry is a plain function `stage(ctx) -> small dict` (safe for XCom). Stages read
their inputs from the artifact store under the same run, so tasks pass no data, only
ordering.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # keep `import pipeline.stages` free of pandas/torch for DAG parsing
    from pipeline.context import RunContext

log = logging.getLogger(__name__)

StageFn = Callable[["RunContext"], dict[str, Any]]


class GateRejected(Exception):
    """The gate decided not to publish: the run ends 'skipped', not failed."""

    def __init__(self, decision: dict[str, Any]) -> None:
        super().__init__(decision.get("reason", "rejected by the gate"))
        self.decision = decision


def _registry() -> dict[str, StageFn]:
    # imported lazily so `import pipeline.stages` (e.g. at DAG parse time) stays cheap
    from pipeline.data.extract import extract
    from pipeline.evaluation.evaluate import evaluate
    from pipeline.features.stage import features
    from pipeline.gate.stage import gate
    from pipeline.index.build import index
    from pipeline.release.publish import publish
    from pipeline.release.refresh import refresh
    from pipeline.training.select import select
    from pipeline.training.train import refit, train
    from pipeline.validation.stage import validate

    return {
        "extract": extract,
        "validate": validate,
        "features": features,
        "select": select,
        "train": train,
        "evaluate": evaluate,
        "gate": gate,
        "refit": refit,
        "index": index,
        "publish": publish,
        "refresh": refresh,
    }


STAGES: tuple[str, ...] = (
    "extract",
    "validate",
    "features",
    "select",
    "train",
    "evaluate",
    "gate",
    "refit",
    "index",
    "publish",
    "refresh",
)


def run_stage(name: str, ctx: RunContext) -> dict[str, Any]:
    """Run one stage; the gate raises GateRejected when it says no."""
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    result = _registry()[name](ctx)
    if name == "gate" and not result.get("publish"):
        raise GateRejected(result)
    return result


def run_all(ctx: RunContext, until: str | None = None) -> dict[str, dict[str, Any]]:
    """Every stage in order, in this process. Raises GateRejected or the failing stage's error."""
    results: dict[str, dict[str, Any]] = {}
    for name in STAGES:
        log.info("stage %s: start (tenant %s, run %s)", name, ctx.tenant, ctx.run_id)
        results[name] = run_stage(name, ctx)
        if name == until:
            break
    return results
