"""refit: fit the same configuration on ALL events up to the interval end: what gets published.

It runs after the gate, so a rejected run spends no more compute.
"""

from __future__ import annotations

from typing import Any

from pipeline.context import RunContext, StageIO
from pipeline.storage import paths
from pipeline.training.fit import READS, fit

STAGE = "refit"
IO = StageIO(reads=READS, writes=(paths.REFITTED.weights, paths.REFITTED.meta, paths.REFIT_RESULT, paths.REFIT_RANKER))


def refit(ctx: RunContext) -> dict[str, Any]:
    return fit(ctx, STAGE, holdout=None, out=paths.REFITTED, ranker=paths.REFIT_RANKER)
