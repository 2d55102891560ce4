"""evaluate: Recall/NDCG/MAP/HitRate/Precision@K, coverage, diversity and novelty on the temporal holdout.

Full ranking: every item is a candidate except the user's own training items, for at most
`evaluation.max_users` holdout users (the same ones every run, `scoring.sample_users`). Baselines
fitted on the same train split are scored the same way, on the same users, so the numbers
compare: popularity, cosine item-kNN (up to `evaluation.knn_max_items` items) and EASE (up
to `evaluation.ease_max_items`). The events are read as streamed columns (`Interactions`),
never as a table in pandas, so a 100M-event tenant evaluates within the box's memory. The
scoring itself is pipeline/evaluation/scoring.py; diversity, novelty and the per-segment
breakdown are pipeline/evaluation/beyond.py.

metrics.json: {k, model, users, metrics: {model: {metric: value}}, segments: {segmentation:
{value: {users, metric: value}}} (the run's model only), diversity_basis}. per_user.parquet
has every model's per-user metrics and each user's segment labels (`segment_<name>`).
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from pipeline.context import RunContext, StageIO
from pipeline.data.attributes import load_users
from pipeline.evaluation import beyond
from pipeline.evaluation.scoring import at_k, baseline_kinds, baselines, evaluate_model_lists, sample_users
from pipeline.features.dataset import Interactions, read_item_features, relevant_of, train_data
from pipeline.models import Recommender
from pipeline.models.io import read_model
from pipeline.models.popularity import Popularity
from pipeline.ops import tracking
from pipeline.storage import codecs, paths
from pipeline.twostage import stage as two_stage

if TYPE_CHECKING:
    from pipeline.models.base import ItemFeatures

STAGE = "evaluate"
IO = StageIO(
    reads=(
        paths.USERS,
        paths.ITEMS,
        paths.EVENTS,
        paths.TRAINED.weights,
        paths.TRAINED.meta,
        paths.TRAIN_RESULT,
        paths.ITEM_FEATURES,
        paths.USER_ATTRIBUTES,
        paths.TRAINED_RANKER,
    ),
    writes=(paths.METRICS, paths.PER_USER_METRICS),
)


def evaluate(ctx: RunContext) -> dict[str, Any]:
    log = ctx.logger(STAGE)
    cfg = ctx.config.evaluation
    k = cfg.k
    feats = Interactions.read(ctx)  # streamed columns, never the events table in pandas
    users, n_users, n_items = feats.users, feats.n_users, feats.n_items
    exclude = feats.matrix(False)
    relevant = sample_users(relevant_of(feats.matrix(True), exclude), users["user_id"], cfg.max_users)
    del feats  # 17 bytes per event: the matrices are all that is needed from here
    model = read_model(ctx, paths.TRAINED)
    item_attrs = read_item_features(ctx)
    item_users = np.bincount(exclude.indices, minlength=n_items)  # distinct train users per item
    started = time.perf_counter()
    two_stage_data = None
    if baseline_kinds(n_items, cfg.ease_max_items, cfg.knn_max_items) == ["popularity"] and not (
        ctx.config.two_stage.enabled
    ):  # popularity alone is the train matrix's column counts: no events to read (100M: 3.2 GB, a minute)
        base: dict[str, Recommender] = {"popularity": Popularity.from_counts(item_users, n_users)}
    else:
        train = train_data(ctx, False)
        base = baselines(train, cfg.ease_max_items, cfg.knn_max_items)
        if ctx.config.two_stage.enabled:
            two_stage_data = dataclasses.replace(train, item_features=item_attrs)
        del train  # 40 bytes per train event: not kept through the scoring unless two stages need it
    log.info("evaluate: baselines %s fitted in %.1fs", sorted(base), time.perf_counter() - started)
    candidates = {model.kind: model, **{name: m for name, m in base.items() if name != model.kind}}
    results: dict[str, dict[str, float | None]] = {}
    per_user_cols: dict[str, Any] = {}
    item_matrix, basis = _diversity_basis(item_attrs, exclude)
    segments: dict[str, Any] = {}
    for name, m in candidates.items():
        (summary, per_user, rows), top = evaluate_model_lists(m, relevant, exclude, k)
        lists = beyond.list_metrics(top, item_matrix, item_users, n_users)
        results[name] = {**at_k(summary, k), **beyond.summarize_lists(lists, k)}
        per_user_cols["user_idx"] = rows.astype(np.int32)
        per_user_cols.update({f"{name}_{metric}": values for metric, values in {**per_user, **lists}.items()})
        if name == model.kind:
            labels = _segments(ctx, users, rows)
            segments = beyond.segment_report({**per_user, **lists}, top, n_items, labels, k)
            per_user_cols.update({f"segment_{s}": pd.array(v, dtype="string") for s, v in labels.items()})
    del base, candidates
    if two_stage_data is not None:  # the model as one candidate source, reordered by the trained ranker
        two = two_stage.evaluate(ctx, two_stage_data, model, relevant, k, paths.TRAINED_RANKER)
        if two is not None:
            results[two_stage.NAME] = {**at_k(two[0], k)}
            per_user_cols.update({f"{two_stage.NAME}_{metric}": values for metric, values in two[1].items()})
    ctx.write(paths.PER_USER_METRICS, codecs.parquet_bytes(pd.DataFrame(per_user_cols)))
    report = {
        "k": k,
        "model": model.kind,
        "users": int(len(per_user_cols["user_idx"])),
        "metrics": results,
        "segments": segments,
        "diversity_basis": basis,
    }
    ctx.write(paths.METRICS, codecs.json_bytes(report))
    train_run = ctx.read_json(paths.TRAIN_RESULT).get("mlflow_run_id") if ctx.exists(paths.TRAIN_RESULT) else None
    if train_run:
        flat = {f"{name}.{metric}": v for name, vals in results.items() for metric, v in vals.items()}
        flat.update(_segment_metrics(segments))
        tracking.log_metrics(ctx, train_run, {n: v for n, v in flat.items() if v is not None and np.isfinite(v)})
    log.info("evaluate on %d users, full ranking of %d items:\n%s", report["users"], n_items, format_table(results))
    return ctx.write_result(STAGE, {**report, "metrics_uri": ctx.uri(paths.METRICS)})


def _diversity_basis(attrs: ItemFeatures | None, train: sp.csr_matrix) -> tuple[sp.csr_matrix, str]:
    """Item rows diversity is measured on: catalog category + tags, else train co-occurrence."""
    if attrs is not None:
        matrix = beyond.attribute_matrix(attrs.category, attrs.tags)
        if matrix.nnz:
            return matrix, "catalog category and tags"
    return sp.csr_matrix(train.T), "train users per item (no catalog attributes)"


def _segments(ctx: RunContext, users: pd.DataFrame, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Segment labels of the evaluated users (rows): activity, cold/warm, the tenant's user attributes."""
    n_train = users["n_train"].to_numpy()[rows]
    out = {
        "activity": beyond.activity_bucket(n_train),
        "cold_warm": np.where(n_train < beyond.COLD_USER_EVENTS, "cold", "warm").astype(object),
    }
    attrs = load_users(ctx)
    if attrs is not None and len(attrs.columns) > 1:
        ids = pd.DataFrame({"user_id": users["user_id"].astype("string").to_numpy()[rows]})
        joined = ids.merge(attrs.astype({"user_id": "string"}), on="user_id", how="left", validate="many_to_one")
        for col in attrs.columns.drop("user_id"):
            out[f"user.{col}"] = beyond.attribute_segments(joined[col])
    return out


def _segment_metrics(segments: dict[str, dict[str, dict[str, float | None]]]) -> dict[str, float | None]:
    """segment.<segmentation>.<value>.<metric> for MLflow (characters it refuses become '_')."""
    flat = {}
    for seg, groups in segments.items():
        for value, vals in groups.items():
            for metric, v in vals.items():
                flat[re.sub(r"[^\w\-. :/@]", "_", f"segment.{seg}.{value}.{metric}")] = v
    return flat


def format_table(results: dict[str, dict[str, float | None]]) -> str:
    names = list(next(iter(results.values())).keys())
    names = [n for n in names if n != "users"]
    header = f"{'model':<12}" + "".join(f"{n:>14}" for n in names)
    cell = lambda v: f"{v:>14.4f}" if v is not None else f"{'-':>14}"  # noqa: E731
    lines = [header] + [f"{m:<12}" + "".join(cell(vals.get(n)) for n in names) for m, vals in results.items()]
    return "\n".join(lines)
