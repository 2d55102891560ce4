"""gate: publish only when the evidence says the new model is good enough.

Every check has a name, a value and a threshold, and ALL must pass (skipped ones excepted):

  beats_popularity  the challenger's `gate.metric`@K on the holdout is above the popularity
                    baseline's, both scored on the same users by the same ranking rules
                    (evaluate's numbers). `gate.require_beat_popularity` (on) can turn it off.
  vs_champion       paired non-inferiority against the live release. Both models rank for the
                    SAME users on the SAME fresh held-out events (below); per user
                    d_u = metric_u(challenger) - metric_u(champion). A percentile bootstrap
                    over users (`gate.bootstrap_resamples` 1000, `gate.confidence` 0.95,
                    `gate.seed` 0: the same evidence always gives the same decision) gives a
                    confidence interval of mean(d); the check passes when its LOWER bound is
                    >= -`gate.tolerance` (0.01). A positive mean is not enough: few or noisy
                    users make the interval wide, and then the live release stays. That is
                    self-correcting: a rejection does not move the champion's cutoff, so the
                    next run compares on more fresh events.
  coverage          catalog coverage (distinct recommended items / catalog) of the
                    challenger's top-K lists must not collapse: >= max(`gate.min_coverage_ratio`
                    (0.5) x the champion's coverage on the same users, `gate.min_coverage` (0)).
                    Without a live release: >= max(popularity's coverage, `gate.min_coverage`);
                    lists less diverse than "the same popular items for everyone" have collapsed.
  cold_item_recall  pooled recall@K restricted to relevant COLD items (fewer than
                    `gate.cold_item_max_users` (5) distinct users in this run's train split;
                    items first seen in the holdout included) must not fall more than
                    `gate.max_cold_recall_drop` (0.02, absolute) below the champion's, on the
                    same users and events.
  long_tail_recall  the same for LONG-TAIL items: all items outside the head, the top
                    `gate.head_fraction` (20%) of items by train popularity;
                    `gate.max_long_tail_recall_drop` (0.02).
                    Both guardrails are skipped ("not enough data") when their group has fewer
                    than `gate.min_group_relevant` (30) relevant (user, item) pairs: a recall
                    over a handful of pairs is noise. Definitions: pipeline/evaluation/metrics.py.

The fair comparison: the live release was refit on everything up to its own interval end, so
it has already seen (and would be flattered by) older holdout events. The champion checks use
only held-out events at/after the champion's data cutoff, with the same exclusions for both
models (all other events of the user). Users the champion does not know get its popularity
list; items it does not know cannot be ranked by it, as in serving. With fewer than
`gate.min_users` (50) such users (a rerun of the same interval, say) it falls back to the
champion's RECORDED holdout metrics and says so (`basis`): vs_champion is then a point
comparison (no pairing, no interval), coverage compares with the recorded coverage, and the
two group guardrails are skipped (no comparable per-group numbers).

Without a live release, or for a backfill (its release never goes live): beats_popularity and
coverage only.

`decide` (pipeline/gate/policy.py) is a pure function of the evidence and the policy; the
champion's scores come from pipeline/gate/champion.py. This stage gathers the evidence and
records the decision in `gate/decision.json` (with the per-user pairs in `gate/paired.parquet`),
on the train run in MLflow (metrics `gate.*`, tags `recsys.gate*`) and as a table in the task
log. A rejection ends the run as "skipped" with its reason recorded; it is not a failure.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np
import pandas as pd

from pipeline.context import RunContext, StageIO
from pipeline.features.dataset import Interactions
from pipeline.gate.champion import FreshComparison, compare_on_fresh_holdout, item_groups
from pipeline.gate.policy import ChallengerEvidence, ChampionEvidence, Decision, decide, format_table
from pipeline.models.io import read_model
from pipeline.ops import tracking
from pipeline.release import format as release
from pipeline.stages import GateRejected
from pipeline.storage import codecs, paths
from pipeline.twostage import stage as two_stage

STAGE = "gate"
IO = StageIO(
    reads=(
        paths.METRICS,
        paths.USERS,
        paths.ITEMS,
        paths.EVENTS,
        paths.TRAINED.weights,
        paths.TRAINED.meta,
        paths.TRAIN_RESULT,
        paths.PER_USER_METRICS,
    ),
    writes=(paths.DECISION, paths.PAIRED),
)


def _gather_champion(
    ctx: RunContext,
    feats: Interactions,
    ev: dict[str, Any],
    challenger: ChallengerEvidence,
    groups: dict[str, np.ndarray],
) -> tuple[ChampionEvidence | None, str | None, FreshComparison | None]:
    policy, k = ctx.config.gate, ctx.config.evaluation.k
    pointer = release.read_pointer(ctx.store, ctx.tenant)
    if pointer is None:
        return None, None, None
    live = pointer[0]
    if live["data_interval_end"] > ctx.interval_end.isoformat():
        # a backfill of an older interval: its release is archived, never made live over newer data
        return None, f"live release {live['release_id']} covers newer data; no champion comparison (backfill)", None
    champ_id = live["release_id"]
    champ = release.load_release(ctx.store, ctx.tenant, champ_id)
    cmp = compare_on_fresh_holdout(
        feats, read_model(ctx, paths.TRAINED), champ, k, policy.metric, groups, ctx.config.evaluation.max_users
    )
    if cmp.users >= policy.min_users:
        evidence = ChampionEvidence(
            champ_id,
            "same_holdout",
            cmp.users,
            float(cmp.challenger.mean()),
            float(cmp.champion.mean()),
            diffs=cmp.challenger - cmp.champion,
            challenger_coverage=cmp.challenger_coverage,
            champion_coverage=cmp.champion_coverage,
            cold=cmp.groups.get("cold"),
            long_tail=cmp.groups.get("long_tail"),
        )
        return evidence, None, cmp
    recorded = champ.manifest.get("metrics", {}).get(champ.manifest.get("model", ""), {})
    if recorded.get(challenger.metric) is None:
        return (
            None,
            f"live release {champ_id} has no recorded {challenger.metric} and {cmp.users} comparable users",
            None,
        )
    evidence = ChampionEvidence(
        champ_id,
        f"recorded (only {cmp.users} users with events after its cutoff)",
        int(ev["users"]),
        challenger.value,
        float(recorded[challenger.metric]),
        challenger_coverage=challenger.coverage,
        champion_coverage=recorded.get("coverage"),
    )
    return evidence, None, None


def gate(ctx: RunContext) -> dict[str, Any]:
    log = ctx.logger(STAGE)
    policy = ctx.config.gate
    k = ctx.config.evaluation.k
    name = f"{policy.metric}@{k}"
    if not ctx.exists(paths.METRICS):
        raise ctx.error(STAGE, "no evaluation result for this run; run evaluate first")
    ev = ctx.read_json(paths.METRICS)
    model_metrics, pop_metrics = ev["metrics"][ev["model"]], ev["metrics"]["popularity"]
    challenger = ChallengerEvidence(
        name,
        float(model_metrics[name]),
        float(pop_metrics[name]),
        float(model_metrics["coverage"]),
        float(pop_metrics["coverage"]),
        int(ev["users"]),
    )
    feats = Interactions.read(ctx)  # streamed columns, never the events table in pandas
    groups = item_groups(feats, policy)
    champion, note, cmp = _gather_champion(ctx, feats, ev, challenger, groups)
    decision = decide(challenger, champion, policy, note)
    record = {
        **decision.to_dict(),
        "metric": name,
        "basis": champion.basis if champion else None,
        "champion_release_id": champion.release_id if champion else None,
        "champion": champion.summary() if champion else None,
        "challenger": asdict(challenger),
        "item_groups": {g: int(mask.sum()) for g, mask in groups.items()} | {"items": feats.n_items},
        "note": note,
        "policy": policy.model_dump(mode="json"),
    }
    if two_stage.NAME in ev["metrics"]:  # two-stage against its single stage, like any challenger
        per_user = ctx.read_parquet(paths.PER_USER_METRICS)
        record[two_stage.NAME] = two_stage.judge(per_user, ev["model"], policy.metric, policy)
    if cmp is not None:
        paired = pd.DataFrame({"user_idx": cmp.user_idx, "challenger": cmp.challenger, "champion": cmp.champion})
        ctx.write(paths.PAIRED, codecs.parquet_bytes(paired))
    else:  # no paired comparison this time: leave no earlier attempt's pairs behind
        ctx.delete(paths.PAIRED)
    ctx.write(paths.DECISION, codecs.json_bytes(record))
    train_run = ctx.read_json(paths.TRAIN_RESULT).get("mlflow_run_id") if ctx.exists(paths.TRAIN_RESULT) else None
    if train_run:
        _track(ctx, train_run, decision, champion)
    log.info("gate: %s\n%s", decision.reason, format_table(decision))
    if record.get(two_stage.NAME):
        log.info("gate: %s", record[two_stage.NAME]["reason"])
    ctx.write_result(STAGE, record)
    if not decision.publish:
        raise GateRejected(record)  # the run ends "skipped": downstream stages do not run
    return record


def _track(ctx: RunContext, run_id: str, decision: Decision, champion: ChampionEvidence | None) -> None:
    values: dict[str, float] = {"gate.publish": 1.0 if decision.publish else 0.0}
    for c in decision.checks:
        if c.value is not None and np.isfinite(c.value):
            values[f"gate.{c.name}"] = c.value
        if c.threshold is not None and np.isfinite(c.threshold):
            values[f"gate.{c.name}.threshold"] = c.threshold
    if decision.ci:
        values |= {
            "gate.vs_champion.mean_diff": decision.ci["mean_diff"],
            "gate.vs_champion.ci_low": decision.ci["low"],
            "gate.vs_champion.ci_high": decision.ci["high"],
        }
    tracking.log_metrics(ctx, run_id, values)
    tags = {
        "recsys.gate": "publish" if decision.publish else "reject",
        "recsys.gate_reason": decision.reason[:5000],
        "recsys.gate_basis": champion.basis if champion else "no champion",
        "recsys.gate_champion": champion.release_id if champion else "",
    }
    tags |= {f"recsys.gate.{c.name}": c.status for c in decision.checks}
    tracking.set_tags(ctx, run_id, tags)
