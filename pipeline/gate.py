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
                    over a handful of pairs is noise. Definitions: pipeline/metrics.py.

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

`decide` is a pure function of the evidence and the policy. The stage gathers the evidence and
records the decision in `gate/decision.json` (with the per-user pairs in `gate/paired.parquet`),
on the train run in MLflow (metrics `gate.*`, tags `recsys.gate*`) and as a table in the task
log. A rejection ends the run as "skipped" with its reason recorded; it is not a failure.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from pipeline import features, metrics, ranking, release, tracking, train
from pipeline.config.tenant import GateConfig
from pipeline.context import RunContext
from pipeline.storage import codecs

STAGE = "gate"
EPS = 1e-12  # thresholds are inclusive; float noise at the boundary must not decide


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    value: float | None
    threshold: float | None
    detail: str
    skipped: bool = False  # not applicable or not enough data: counts as passed

    @property
    def status(self) -> str:
        return "SKIP" if self.skipped else ("PASS" if self.passed else "FAIL")

    def to_dict(self) -> dict[str, Any]:
        return _json_safe({**asdict(self), "status": self.status})


@dataclass(frozen=True)
class Decision:
    publish: bool
    reason: str
    checks: list[Check] = field(default_factory=list)
    ci: dict[str, Any] | None = None  # the bootstrap interval of vs_champion, when there was one

    def to_dict(self) -> dict[str, Any]:
        return {
            "publish": self.publish,
            "reason": self.reason,
            "checks": [c.to_dict() for c in self.checks],
            "ci": self.ci,
        }


@dataclass(frozen=True)
class ChallengerEvidence:
    """The challenger and popularity on this run's holdout (same users): evaluate's numbers."""

    metric: str  # e.g. "ndcg@10"
    value: float
    popularity: float
    coverage: float
    popularity_coverage: float
    users: int


@dataclass(frozen=True)
class GroupRecall:
    """Pooled recall on the relevant items of one group, both models on the same pairs."""

    relevant: int
    challenger: float
    champion: float


@dataclass(frozen=True)
class ChampionEvidence:
    release_id: str
    basis: str  # "same_holdout" or "recorded (...)"
    users: int
    challenger: float  # mean metric over the compared users
    champion: float
    diffs: np.ndarray | None = field(default=None, compare=False)  # per user, challenger - champion
    challenger_coverage: float | None = None
    champion_coverage: float | None = None
    cold: GroupRecall | None = None
    long_tail: GroupRecall | None = None

    def summary(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "diffs"}
        out["paired_users"] = 0 if self.diffs is None else int(len(self.diffs))
        return _json_safe(out)


def _json_safe(obj: Any) -> Any:
    """NaN/inf (e.g. the recall of an empty group) become null: decision.json stays strict JSON."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def _vs_champion(metric: str, champ: ChampionEvidence, policy: GateConfig) -> tuple[Check, dict[str, Any] | None]:
    floor = -policy.tolerance
    if champ.diffs is not None and len(champ.diffs):
        mean, low, high = metrics.bootstrap_mean_ci(
            champ.diffs, policy.bootstrap_resamples, policy.confidence, policy.seed
        )
        ci = {
            "metric": metric,
            "mean_diff": mean,
            "low": low,
            "high": high,
            "confidence": policy.confidence,
            "resamples": policy.bootstrap_resamples,
            "seed": policy.seed,
            "users": int(len(champ.diffs)),
        }
        detail = (
            f"{metric} challenger - live release {champ.release_id}: mean {mean:+.4f}, "
            f"{policy.confidence:.0%} CI [{low:+.4f}, {high:+.4f}] over {len(champ.diffs)} paired users "
            f"({champ.basis}); lower bound must be >= {floor:+.4f}"
        )
        return Check("vs_champion", low >= floor - EPS, low, floor, detail), ci
    diff = champ.challenger - champ.champion
    detail = (
        f"{metric} {champ.challenger:.4f} vs live release {champ.release_id} {champ.champion:.4f} "
        f"(difference {diff:+.4f}, tolerance {policy.tolerance}; {champ.basis}: point comparison, no interval)"
    )
    return Check("vs_champion", diff >= floor - EPS, diff, floor, detail), None


def _coverage(ch: ChallengerEvidence, champ: ChampionEvidence | None, policy: GateConfig) -> Check:
    if champ is not None and champ.champion_coverage is not None:
        value = ch.coverage if champ.challenger_coverage is None else champ.challenger_coverage
        threshold = max(policy.min_coverage_ratio * champ.champion_coverage, policy.min_coverage)
        detail = (
            f"coverage {value:.4f} vs live release {champ.champion_coverage:.4f} "
            f"(floor {policy.min_coverage_ratio} x = {threshold:.4f}; {champ.basis})"
        )
    else:
        value = ch.coverage
        threshold = max(ch.popularity_coverage, policy.min_coverage)
        detail = f"coverage {value:.4f} vs popularity {ch.popularity_coverage:.4f} (floor {threshold:.4f})"
    return Check("coverage", value >= threshold - EPS, value, threshold, detail)


def _guardrail(
    name: str, label: str, group: GroupRecall | None, max_drop: float, champ: ChampionEvidence, policy: GateConfig
) -> Check:
    if group is None:
        return Check(
            name, True, None, None, f"{label} recall not compared: live release scored from {champ.basis}", skipped=True
        )
    if group.relevant < policy.min_group_relevant:
        return Check(
            name,
            True,
            None if group.relevant == 0 else group.challenger,
            None,
            f"not enough data: {group.relevant} relevant {label} pairs among the compared users "
            f"(gate.min_group_relevant={policy.min_group_relevant})",
            skipped=True,
        )
    threshold = group.champion - max_drop
    detail = (
        f"{label} recall {group.challenger:.4f} vs live release {group.champion:.4f} "
        f"on {group.relevant} relevant pairs (allowed drop {max_drop})"
    )
    return Check(name, group.challenger >= threshold - EPS, group.challenger, threshold, detail)


def decide(
    challenger: ChallengerEvidence,
    champion: ChampionEvidence | None,
    policy: GateConfig,
    champion_note: str | None = None,
) -> Decision:
    """Publish or not, and why. Pure: the bootstrap is seeded by the policy.

    champion None: no live release, or (champion_note) no comparison applies, e.g. a backfill.
    """
    metric = challenger.metric
    checks: list[Check] = []
    ci = None
    if policy.require_beat_popularity:
        checks.append(
            Check(
                "beats_popularity",
                challenger.value > challenger.popularity,
                challenger.value,
                challenger.popularity,
                f"{metric} {challenger.value:.4f} vs popularity {challenger.popularity:.4f} "
                f"on {challenger.users} users",
            )
        )
    if champion is not None:
        check, ci = _vs_champion(metric, champion, policy)
        checks.append(check)
    checks.append(_coverage(challenger, champion, policy))
    if champion is not None:
        checks.append(
            _guardrail("cold_item_recall", "cold-item", champion.cold, policy.max_cold_recall_drop, champion, policy)
        )
        checks.append(
            _guardrail(
                "long_tail_recall", "long-tail", champion.long_tail, policy.max_long_tail_recall_drop, champion, policy
            )
        )
    failed = [c for c in checks if not c.passed]
    if failed:
        return Decision(False, "rejected: " + "; ".join(f"{c.name}: {c.detail}" for c in failed), checks, ci)
    evidence = "; ".join(c.detail for c in checks if not c.skipped)
    if champion is None:
        return Decision(True, f"publish: {champion_note or 'no live release yet'}; {evidence}", checks, ci)
    return Decision(True, f"publish: {evidence}", checks, ci)


# --- evidence --------------------------------------------------------------------------------


def item_groups(feats: features.Features, policy: GateConfig) -> dict[str, np.ndarray]:
    """Boolean item masks (this run's index space) of the cold and long-tail groups."""
    users_per_item = np.asarray(feats.matrix(False).sum(axis=0)).ravel()
    return {
        "cold": metrics.cold_items(users_per_item, policy.cold_item_max_users),
        "long_tail": metrics.long_tail_items(users_per_item, policy.head_fraction),
    }


@dataclass(frozen=True)
class _Ranked:
    rows: np.ndarray
    top: np.ndarray
    hits: np.ndarray
    per_user: dict[str, np.ndarray]


def _rank(U, V, relevant: sp.csr_matrix, exclude: sp.csr_matrix, k: int, allowed=None) -> _Ranked:
    rows = np.flatnonzero(np.diff(relevant.indptr) > 0)
    top = ranking.topk_dot(U[rows], V, k, exclude=exclude[rows], item_allowed=allowed)
    hits = metrics.hits_matrix(top, rows, relevant)
    return _Ranked(rows, top, hits, metrics.per_user_metrics(hits, np.diff(relevant.indptr)[rows]))


def _champion_vectors(champ: release.Release, feats: features.Features) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Champion vectors in the challenger's index space, plus one popularity dimension.

    Known users get [x_u, 0]; unknown users [0, 1], i.e. the champion's popularity list.
    Items the champion does not know are not allowed in its ranking.
    """
    urow = champ.user_ids.get_indexer(feats.users["user_id"].astype(str).to_numpy())
    irow = champ.item_ids.get_indexer(feats.items["item_id"].astype(str).to_numpy())
    d = champ.item_vectors.shape[1]
    U = np.zeros((feats.n_users, d + 1), dtype=np.float32)
    known_u = urow >= 0
    U[known_u, :d] = champ.user_vectors[urow[known_u]]
    U[~known_u, d] = 1.0
    V = np.zeros((feats.n_items, d + 1), dtype=np.float32)
    allowed = irow >= 0
    V[allowed, :d] = champ.item_vectors[irow[allowed]]
    pop = champ.item_popularity[irow[allowed]]
    V[allowed, d] = (pop / max(pop.max(), 1.0)).astype(np.float32) if len(pop) else 0.0
    return U, V, allowed


@dataclass(frozen=True)
class FreshComparison:
    """Both models on held-out events the champion never trained on (same users, same events)."""

    user_idx: np.ndarray
    challenger: np.ndarray  # per-user metric, aligned with user_idx
    champion: np.ndarray
    challenger_coverage: float
    champion_coverage: float
    groups: dict[str, GroupRecall]

    @property
    def users(self) -> int:
        return int(len(self.user_idx))


def compare_on_fresh_holdout(
    feats: features.Features,
    challenger,
    champ: release.Release,
    k: int,
    metric: str,
    groups: dict[str, np.ndarray],
) -> FreshComparison:
    cutoff = pd.Timestamp(champ.manifest["data_interval_end"])
    ev = feats.events
    fresh_ev = ev[ev["holdout"] & (ev["timestamp"] >= cutoff)]
    fresh = sp.csr_matrix(
        (np.ones(len(fresh_ev), np.float32), (fresh_ev["user_idx"], fresh_ev["item_idx"])),
        shape=(feats.n_users, feats.n_items),
    )
    fresh = feats.relevant().multiply(fresh > 0).tocsr()
    fresh.eliminate_zeros()
    if fresh.nnz == 0:
        empty = np.zeros(0)
        return FreshComparison(empty.astype(np.int32), empty, empty, float("nan"), float("nan"), {})
    seen = feats.matrix(None)
    exclude = (seen - seen.multiply(fresh > 0)).tocsr()
    exclude.eliminate_zeros()
    ch = _rank(challenger.user_vectors(), challenger.item_vectors(), fresh, exclude, k)
    U, V, allowed = _champion_vectors(champ, feats)
    cp = _rank(U, V, fresh, exclude, k, allowed)
    rel_rows = fresh[ch.rows]
    recalls = {}
    for name, mask in groups.items():
        r_ch, n = metrics.group_recall(ch.hits, ch.top, rel_rows, mask)
        r_cp, _ = metrics.group_recall(cp.hits, cp.top, rel_rows, mask)
        recalls[name] = GroupRecall(n, r_ch, r_cp)
    return FreshComparison(
        user_idx=ch.rows.astype(np.int32),
        challenger=ch.per_user[metric],
        champion=cp.per_user[metric],
        challenger_coverage=metrics.coverage(ch.top, feats.n_items),
        champion_coverage=metrics.coverage(cp.top, feats.n_items),
        groups=recalls,
    )


def _gather_champion(
    ctx: RunContext,
    feats: features.Features,
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
    cmp = compare_on_fresh_holdout(feats, train.load_model(ctx, "train"), champ, k, policy.metric, groups)
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


def _fmt(x: float | None) -> str:
    return "-" if x is None or not np.isfinite(x) else f"{x:.4f}"


def format_table(decision: Decision) -> str:
    """One line per check: STATUS name value threshold detail."""
    lines = [f"  {'':<4} {'check':<17} {'value':>8} {'threshold':>9}  detail"]
    lines += [
        f"  {c.status:<4} {c.name:<17} {_fmt(c.value):>8} {_fmt(c.threshold):>9}  {c.detail}" for c in decision.checks
    ]
    return "\n".join(lines)


def gate(ctx: RunContext) -> dict[str, Any]:
    log = ctx.logger(STAGE)
    policy = ctx.config.gate
    k = ctx.config.evaluation.k
    name = f"{policy.metric}@{k}"
    ev = ctx.read_result("evaluate")
    if ev is None:
        raise ctx.error(STAGE, "no evaluation result for this run; run evaluate first")
    model_metrics, pop_metrics = ev["metrics"][ev["model"]], ev["metrics"]["popularity"]
    challenger = ChallengerEvidence(
        name,
        float(model_metrics[name]),
        float(pop_metrics[name]),
        float(model_metrics["coverage"]),
        float(pop_metrics["coverage"]),
        int(ev["users"]),
    )
    feats = features.load(ctx)
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
    if cmp is not None:
        paired = pd.DataFrame({"user_idx": cmp.user_idx, "challenger": cmp.challenger, "champion": cmp.champion})
        ctx.store.put(ctx.key(STAGE, "paired.parquet"), codecs.parquet_bytes(paired))
    ctx.store.put(ctx.key(STAGE, "decision.json"), codecs.json_bytes(record))
    train_run = (ctx.read_result("train") or {}).get("mlflow_run_id")
    if train_run:
        _track(ctx, train_run, decision, champion)
    log.info("gate: %s\n%s", decision.reason, format_table(decision))
    return ctx.write_result(STAGE, record)


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
