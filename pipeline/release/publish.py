"""publish: write the immutable release, then flip the tenant's pointer (last).

What scores the release follows the model's kind (registry.scoring): a dot-product model
ships its user/item vectors and the index stage's FAISS index; an item-item model (EASE,
item-kNN) ships its similarity matrix S, and the index stage wrote no FAISS file for it.
"""

from __future__ import annotations

from typing import Any, cast

import numpy as np

from pipeline.context import RunContext, StageIO
from pipeline.data import attributes
from pipeline.data.attributes import load_users as attributes_of_users
from pipeline.experiments import challenger
from pipeline.features.dataset import Interactions, read_item_features, train_data
from pipeline.models import DotProduct, ItemItem, Recommender, registry
from pipeline.models.io import from_bytes
from pipeline.ops import tracking
from pipeline.release import alias, candidates, segments
from pipeline.release import format as release
from pipeline.storage import codecs, paths
from pipeline.twostage import stage as two_stage

STAGE = "publish"
IO = StageIO(
    reads=(
        paths.USERS,
        paths.ITEMS,
        paths.EVENTS,
        paths.USER_STATS,
        paths.ITEM_STATS,
        paths.CATALOG,
        paths.USER_ATTRIBUTES,
        paths.REFITTED.weights,
        paths.REFITTED.meta,
        paths.REFIT_RESULT,
        paths.REFIT_RANKER,
        paths.ITEM_FEATURES,
        paths.INDEX,
        paths.INDEX_INFO,
        paths.METRICS,
        paths.DECISION,
    ),
    writes=(paths.result("publish"),),
)
# what the manifest keeps of the gate's decision (the run's gate/decision.json has all the evidence)
GATE_FIELDS = ("publish", "reason", "checks", "metric", "basis", "champion_release_id", "ci", "two_stage")


def _seen_csr(feats: Interactions) -> tuple[np.ndarray, np.ndarray]:
    """Each user's distinct items, most recent first (serving's fold-in weighs by recency).

    One lexsort over the events (user, then latest first, ties by item index), keeping each
    (user, item)'s first, i.e. latest, event: vectorised, no groupby over the events table.
    """
    u, i = feats.user_idx, feats.item_idx
    order = np.lexsort((i, -feats.timestamp.view(np.int64), u))
    pair = u[order].astype(np.int64) * max(feats.n_items, 1) + i[order]
    del order
    first = np.unique(pair, return_index=True)[1]  # each pair's first place: its latest event
    first.sort()  # back to (user, latest first, item) order
    pair = pair[first]
    del first
    counts = np.bincount(pair // max(feats.n_items, 1), minlength=feats.n_users)
    indptr = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
    return indptr, (pair % max(feats.n_items, 1)).astype(np.int32)


def _item_attributes(ctx: RunContext, feats: Interactions) -> bytes | None:
    """Category and tags per release item (row = item index), when the tenant has a catalog."""
    catalog = attributes.load_catalog(ctx)
    if catalog is None:
        return None
    attrs = feats.items[["item_id", "item_idx"]].merge(
        catalog[["item_id", "category", "tags", "title"]], on="item_id", how="left", validate="one_to_one"
    )
    return codecs.parquet_bytes(attrs.sort_values("item_idx").reset_index(drop=True))


def build_files(ctx: RunContext) -> tuple[dict[str, bytes], dict[str, Any]]:
    feats = Interactions.read(ctx)  # streamed columns, never the events table in pandas
    model_json = ctx.read(paths.REFITTED.meta)
    model = from_bytes(codecs.read_json(model_json), ctx.read(paths.REFITTED.weights))
    indptr, indices = _seen_csr(feats)
    scores = _scores(ctx, model)
    files = release.assemble_files(
        model_state=model.state(),
        model_kind=model.kind,
        model_json=model_json,
        scores=scores,
        users=feats.users,
        items=feats.items,
        seen_indptr=indptr,
        seen_indices=indices,
        popular_items=ctx.config.serving.popular_items,
    )
    for table in (paths.USER_STATS, paths.ITEM_STATS):  # offline feature tables travel with the release
        files[table.name] = ctx.read(table)
    attributes = _item_attributes(ctx, feats)
    if attributes is not None:
        files["item_attributes.parquet"] = attributes
    users = attributes_of_users(ctx)
    if users is not None:  # cold users get their segment's popular items (release/segments.py)
        files |= segments.segment_files(
            feats.users["user_id"], feats.user_idx, feats.item_idx, users, feats.n_items,
            ctx.config.serving.popular_items,
        )  # fmt: skip
    info: dict[str, Any] = {"users": feats.n_users, "items": feats.n_items, "model": model.kind}
    if isinstance(scores, release.VectorScoring):
        info["dim"] = int(scores.item_vectors.shape[1])
        # each user's top candidates and each item's neighbours: batched searches now, not per request
        files[candidates.FILE] = candidates.file_bytes(
            scores.index_bytes, ctx.read_json(paths.INDEX_INFO), scores.item_vectors, scores.user_vectors,
            indptr, indices,
        )  # fmt: skip
        files[candidates.NEIGHBORS_FILE] = candidates.neighbors_bytes(
            scores.index_bytes, ctx.read_json(paths.INDEX_INFO), scores.item_vectors
        )
    else:
        info |= {"dim": 0, "scoring": "item_item", "similarity_nnz": int(scores.similarity.nnz)}
    if (ctx.read_json(paths.DECISION).get(two_stage.NAME) or {}).get("serve") and ctx.exists(paths.REFIT_RANKER):
        # the gate chose two stages: the refit's ranker and what serving needs to run it
        data = train_data(ctx, None, read_item_features(ctx))
        files |= two_stage.release_files(ctx, data, model, ctx.read(paths.REFIT_RANKER))
        info["two_stage"] = True
    return files, info


def _scores(ctx: RunContext, model: Recommender) -> release.VectorScoring | release.SimilarityScoring:
    if registry.scoring(model.kind) == "item_item":
        return release.SimilarityScoring(cast(ItemItem, model).similarity())
    dot = cast(DotProduct, model)
    return release.VectorScoring(dot.user_vectors(), dot.item_vectors(), ctx.read(paths.INDEX))


def register(ctx: RunContext, release_id: str, live: bool) -> dict[str, Any]:
    """MLflow registry step, after the pointer: a model version for the live release, alias `champion` on it
    (alias.py: if the pointer moved on meanwhile, the alias follows it there, never leads).

    Only a release that is live after this publish is registered (a backfill's or a race
    loser's stays archived; rollback registers it if it ever goes live). Keyed on the
    `release_id` tag, so a retry or an idempotent rerun ("already live") re-finds the same
    version and re-asserts the alias instead of adding a second version.

    MLflow being unreachable does NOT fail the task: the release is already written and live,
    and failing here would make Airflow retry publish and hold back `refresh`, leaving Redis
    serving the previous release while the artifact-store pointer names the new one. The
    error is logged and the result says `registry: failed`; the next publish or a
    `python -m pipeline rollback TENANT --to <live release>` re-syncs the registry.
    """
    if not live:
        return {"registry": "skipped (release not live)"}
    log = ctx.logger(STAGE)
    run_id = ctx.read_json(paths.REFIT_RESULT).get("mlflow_run_id") if ctx.exists(paths.REFIT_RESULT) else None
    out = alias.follow_pointer(ctx.settings.mlflow_tracking_uri, ctx.store, ctx.tenant, release_id, run_id)
    if out.get("registry") == "failed":  # never fatal: the release is live
        log.error(
            "registry: failed to register release %s in MLflow (%s); the release IS live. "
            "Re-sync later with: python -m pipeline rollback %s --to %s",
            release_id,
            out.get("registry_error"),
            ctx.tenant,
            release_id,
        )
        return out
    log.info(
        "registry: %s version %s of %s (%s), alias %s %s",
        release_id,
        out["model_version"],
        out["model_name"],
        out["registry"],
        tracking.CHAMPION_ALIAS,
        out["champion_alias"],
    )
    return out


def publish(ctx: RunContext) -> dict[str, Any]:
    log = ctx.logger(STAGE)
    files, info = build_files(ctx)
    evaluation = ctx.read_json(paths.METRICS)
    gate = ctx.read_json(paths.DECISION)
    idx = ctx.read_json(paths.INDEX_INFO)
    trained = ctx.read_json(paths.REFITTED.meta)  # the configuration actually fitted (select's choice)
    manifest = {
        "created_at": ctx.interval_end.isoformat(),  # logical time of the data, never the wall clock
        "data_interval_end": ctx.interval_end.isoformat(),
        "run_id": ctx.run_id,
        **info,
        "model_config": trained["config"],
        "metrics": evaluation.get("metrics", {}),
        "segments": evaluation.get("segments", {}),  # every metric per user segment (the dashboard's table)
        "gate": {k: gate.get(k) for k in GATE_FIELDS},
        "index": idx,  # kind, recall, ef_search/nprobe, params
    }
    pointer_extra = {"model": info["model"], "run_id": ctx.run_id}
    if ctx.config.challenger.mode == "challenger" and release.read_pointer(ctx.store, ctx.tenant) is not None:
        return _as_challenger(ctx, files, manifest)
    out = release.publish_release(ctx.store, ctx.tenant, files, manifest, pointer_extra=pointer_extra)
    release_id = out.release_id
    current = release.read_pointer(ctx.store, ctx.tenant)
    live = current[0]["release_id"] if current else None
    result = {
        "release_id": release_id,
        "written": out.written,
        "pointer_moved": out.flip.moved,
        "pointer_reason": out.flip.reason,
        "pointer_outcome": out.flip.outcome.value,
        "live_release_id": live,
        **out.verified,
        "files": len(files),
        "bytes": int(sum(len(b) for b in files.values())),
        **register(ctx, release_id, live == release_id),
    }
    log.info(
        "publish: release %s (%s, %d files, %.1f MB); %s",
        release_id,
        "written" if out.written else "already existed",
        len(files),
        result["bytes"] / 1e6,
        out.flip.reason,
    )
    return ctx.write_result(STAGE, result)


def _as_challenger(ctx: RunContext, files: dict[str, bytes], manifest: dict[str, Any]) -> dict[str, Any]:
    """`challenger.mode: challenger`: written and verified like a live release, served to
    `challenger.share` of users by the challenger experiment; the pointer stays until a promotion."""
    share = ctx.config.challenger.share
    out = challenger.publish_challenger(ctx.store, ctx.tenant, files, manifest, share)
    current = release.read_pointer(ctx.store, ctx.tenant)
    result = {
        **out,
        "pointer_moved": False,
        "pointer_outcome": "challenger" if out["challenger"] else "not_challenger",
        "pointer_reason": f"published as challenger to {share:.0%} of users; make it live with: python -m "
        f"pipeline experiment promote {ctx.tenant} challenger challenger"
        if out["challenger"]
        else out["reason"],
        "live_release_id": current[0]["release_id"] if current else None,
        "files": len(files),
        "bytes": int(sum(len(b) for b in files.values())),
    }
    ctx.logger(STAGE).info("publish: %s", result["pointer_reason"])
    return ctx.write_result(STAGE, result)
