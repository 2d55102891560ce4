"""The gate's decision as a pure function of the evidence and the policy (see pipeline/gate/stage.py).

Kept apart from gathering the evidence so that every rule can be tested with hand-made
numbers, and so the decision record (decision.json, MLflow, the task-log table) has one
source: `Decision`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pipeline.config.tenant import GateConfig
from pipeline.evaluation import metrics

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


def _fmt(x: float | None) -> str:
    return "-" if x is None or not np.isfinite(x) else f"{x:.4f}"


def format_table(decision: Decision) -> str:
    """One line per check: STATUS name value threshold detail."""
    lines = [f"  {'':<4} {'check':<17} {'value':>8} {'threshold':>9}  detail"]
    lines += [
        f"  {c.status:<4} {c.name:<17} {_fmt(c.value):>8} {_fmt(c.threshold):>9}  {c.detail}" for c in decision.checks
    ]
    return "\n".join(lines)
