"""train: fit the chosen model on the train split only: what evaluate and the gate judge."""

from __future__ import annotations

from typing import Any

from pipeline.context import RunContext, StageIO
from pipeline.storage import paths
from pipeline.training.fit import READS, fit

STAGE = "train"
IO = StageIO(reads=READS, writes=(paths.TRAINED.weights, paths.TRAINED.meta, paths.TRAIN_RESULT, paths.TRAINED_RANKER))


def train(ctx: RunContext) -> dict[str, Any]:
    return fit(ctx, STAGE, holdout=False, out=paths.TRAINED, ranker=paths.TRAINED_RANKER)
