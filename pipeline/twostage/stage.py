"""What the stages do for `two_stage:` (train/refit fit the ranker, evaluate scores it, the gate
judges it against the single stage, publish ships it). Not a stage itself: the stage modules
call these with the artifacts they declare, so two-stage logic stays out of their files.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from safetensors.numpy import save as st_save

from pipeline.config.models import ModelBase
from pipeline.context import RunContext
from pipeline.evaluation import metrics
from pipeline.models import Recommender, TrainData, build
from pipeline.ops import tracking
from pipeline.storage import codecs
from pipeline.storage.paths import Artifact
from pipeline.twostage import candidates as cg
from pipeline.twostage import features as tf
from pipeline.twostage import model as tsm
from pipeline.twostage.ranker import Ranker

NAME = "two_stage"  # its row in evaluate's metrics, its columns in per_user.parquet
RELEASE_FILES = ("ranker.safetensors", "twostage.safetensors", "twostage.json")


def fit_ranker(
    ctx: RunContext, stage: str, data: TrainData, cfg: ModelBase, device, out: Artifact, run_id: str
) -> dict[str, Any] | None:
    """Fit and write the ranker from `data` (the events this fit may see); None when off. A
    rerun with two_stage turned off removes an earlier attempt's ranker."""
    ts = ctx.config.two_stage
    if not ts.enabled:
        ctx.delete(out)
        return None
    log = ctx.logger(stage)
    try:
        ranker = tsm.fit(ts, data, lambda d: build(cfg, device).fit(d))
    except ValueError as exc:
        raise ctx.error(stage, str(exc)) from exc
    ctx.write(out, ranker.to_bytes())
    top = dict(list(ranker.importance().items())[:8])
    log.info("%s: two-stage ranker %s; top features by gain %s", stage, ranker.report, top)
    tracking.log_metrics(
        ctx, run_id, {f"two_stage.{k}": v for k, v in ranker.report.items() if isinstance(v, int | float)}
    )
    return {**ranker.report, "uri": ctx.uri(out)}


def evaluate(
    ctx: RunContext, data: TrainData, model: Recommender, relevant, k: int, ranker: Artifact
) -> tuple[dict[str, float], dict[str, np.ndarray], np.ndarray] | None:
    """The two-stage recommender's metrics on the holdout (None when off): sources built on the
    train split with the trained model, the trained ranker over them."""
    if not ctx.config.two_stage.enabled or not ctx.exists(ranker):
        return None
    stage = tsm.TwoStage.build(ctx.config.two_stage, Ranker.from_bytes(ctx.read(ranker)), data, model)
    return tsm.evaluate(stage, relevant, k)


def judge(per_user: pd.DataFrame, model: str, metric: str, policy) -> dict[str, Any] | None:
    """Two-stage against the single stage as a challenger, paired by user on the holdout: served
    when it is better on average and the lower bound of the bootstrap interval of the mean
    per-user difference is above -tolerance (the gate's vs_champion rule). None when off."""
    column = f"{NAME}_{metric}"
    if column not in per_user:
        return None
    diffs = per_user[column].to_numpy() - per_user[f"{model}_{metric}"].to_numpy()
    mean, low, high = metrics.bootstrap_mean_ci(diffs, policy.bootstrap_resamples, policy.confidence, policy.seed)
    serve = bool(mean > 0 and low >= -policy.tolerance)
    verdict = "serves the ranker" if serve else "publishes the single stage"
    return {
        "serve": serve,
        "metric": metric,
        "users": len(diffs),
        "mean_diff": round(float(mean), 6),
        "ci": [round(float(low), 6), round(float(high), 6)],
        "reason": f"two-stage vs {model}: mean {metric} diff {mean:+.4f}, CI [{low:+.4f}, {high:+.4f}]: {verdict}",
    }


def release_files(ctx: RunContext, data: TrainData, model: Recommender, ranker_bytes: bytes) -> dict[str, bytes]:
    """What serving needs to run both stages for one user: the ranker, the co-occurrence S,
    segment popularity, the statistics (all from every event, as the refit), the config."""
    ts = ctx.config.two_stage
    src = cg.source_context(data, model, **ts.knobs())
    sim = cg.item_similarity(data, ts.neighbours)
    segment, edges = cg.activity_segments(np.diff(src.seen_indptr), ts.segments)
    arrays = {
        **tf.compute(data).arrays(),
        "similarity_indptr": sim.indptr.astype(np.int64),
        "similarity_indices": sim.indices.astype(np.int64),
        "similarity_data": sim.data.astype(np.float32),
        "segment_table": cg.segment_table(data, segment, ts.half_life_days),
        "segment_edges": edges.astype(np.float64),
    }
    meta = {"config": ts.model_dump(mode="json"), "features": tf.names(tuple(ts.sources))}
    return {
        "ranker.safetensors": ranker_bytes,
        "twostage.safetensors": st_save({k: np.ascontiguousarray(v) for k, v in arrays.items()}),
        "twostage.json": codecs.json_bytes(meta),
    }
