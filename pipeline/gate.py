"""gate: publish only when the evidence says the new model is good enough.

`decide` is a pure function of metrics and policy. The stage gathers the evidence:
  1. the challenger must beat popularity on the holdout (same users, same ranking rules);
  2. it must not fall more than `gate.tolerance` below the live release, both re-scored on
     the SAME holdout events. The live release was refit on everything up to its own
     interval end, so it has already seen (and would be flattered by) older holdout events:
     the comparison uses only held-out events at/after the champion's data cutoff, with the
     same exclusions for both models. Users or items the champion does not know get its
     popularity fallback, as serving would. With fewer than `gate.min_users` such users the
     comparison falls back to the champion's recorded holdout metrics, and says so.
A rejection ends the run as "skipped" with its reason recorded; it is not a failure.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from pipeline import evaluate, features, release, tracking, train
from pipeline.config.tenant import GateConfig
from pipeline.context import RunContext
from pipeline.storage import codecs

STAGE = "gate"


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    value: float | None
    threshold: float | None
    detail: str


@dataclass(frozen=True)
class Decision:
    publish: bool
    reason: str
    checks: list[Check] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"publish": self.publish, "reason": self.reason, "checks": [asdict(c) for c in self.checks]}


@dataclass(frozen=True)
class ChampionEvidence:
    release_id: str
    basis: str  # "same_holdout" or "recorded"
    users: int
    challenger: float
    champion: float


def decide(
    metric: str,
    challenger: float,
    popularity: float,
    champion: ChampionEvidence | None,
    policy: GateConfig,
    champion_note: str | None = None,
) -> Decision:
    """champion None: no live release, or (champion_note) no comparison applies, e.g. a backfill."""
    checks = []
    if policy.require_beat_popularity:
        checks.append(
            Check(
                "beats_popularity",
                challenger > popularity,
                challenger,
                popularity,
                f"{metric} {challenger:.4f} vs popularity {popularity:.4f}",
            )
        )
    if champion is not None:
        floor = champion.champion - policy.tolerance
        checks.append(
            Check(
                "vs_champion",
                champion.challenger >= floor,
                champion.challenger,
                floor,
                f"{metric} {champion.challenger:.4f} vs live release {champion.release_id} {champion.champion:.4f} "
                f"(tolerance {policy.tolerance}, {champion.basis}, {champion.users} users)",
            )
        )
    failed = [c for c in checks if not c.passed]
    if failed:
        return Decision(False, "rejected: " + "; ".join(f"{c.name}: {c.detail}" for c in failed), checks)
    if champion is None:
        why = champion_note or "no live release yet"
        return Decision(True, f"publish: {why}" + (f"; {checks[0].detail}" if checks else ""), checks)
    return Decision(True, "publish: " + "; ".join(c.detail for c in checks), checks)


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


def compare_on_fresh_holdout(
    feats: features.Features, challenger, champ: release.Release, k: int, metric: str
) -> tuple[int, float, float]:
    """(users, challenger, champion) on held-out events the champion never trained on."""
    cutoff = pd.Timestamp(champ.manifest["data_interval_end"])
    ev = feats.events
    fresh_ev = ev[ev["holdout"] & (ev["timestamp"] >= cutoff)]
    fresh = sp.csr_matrix(
        (np.ones(len(fresh_ev), np.float32), (fresh_ev["user_idx"], fresh_ev["item_idx"])),
        shape=(feats.n_users, feats.n_items),
    )
    fresh = feats.relevant().multiply(fresh > 0).tocsr()
    fresh.eliminate_zeros()
    users = int((np.diff(fresh.indptr) > 0).sum())
    if users == 0:
        return 0, float("nan"), float("nan")
    seen = feats.matrix(None)
    exclude = (seen - seen.multiply(fresh > 0)).tocsr()
    exclude.eliminate_zeros()
    ch, _, _ = evaluate.evaluate_vectors(challenger.user_vectors(), challenger.item_vectors(), fresh, exclude, k)
    U, V, allowed = _champion_vectors(champ, feats)
    cp, _, _ = evaluate.evaluate_vectors(U, V, fresh, exclude, k, item_allowed=allowed)
    return users, ch[metric], cp[metric]


def gate(ctx: RunContext) -> dict[str, Any]:
    log = ctx.logger(STAGE)
    policy = ctx.config.gate
    k = ctx.config.evaluation.k
    name = f"{policy.metric}@{k}"
    ev = ctx.read_result("evaluate")
    if ev is None:
        raise ctx.error(STAGE, "no evaluation result for this run; run evaluate first")
    model_metrics, pop_metrics = ev["metrics"][ev["model"]], ev["metrics"]["popularity"]
    champion, note = None, None
    pointer = release.read_pointer(ctx.store, ctx.tenant)
    if pointer is not None and pointer[0]["data_interval_end"] > ctx.interval_end.isoformat():
        # a backfill of an older interval: its release is archived, never made live over newer data
        note = f"live release {pointer[0]['release_id']} covers newer data; no champion comparison (backfill)"
    elif pointer is not None:
        champ_id = pointer[0]["release_id"]
        champ = release.load_release(ctx.store, ctx.tenant, champ_id)
        feats = features.load(ctx)
        users, ch, cp = compare_on_fresh_holdout(feats, train.load_model(ctx, "train"), champ, k, policy.metric)
        if users >= policy.min_users:
            champion = ChampionEvidence(champ_id, "same_holdout", users, ch, cp)
        else:
            recorded = champ.manifest.get("metrics", {}).get(champ.manifest.get("model", ""), {}).get(name)
            if recorded is not None:
                champion = ChampionEvidence(
                    champ_id,
                    f"recorded (only {users} users with events after its cutoff)",
                    int(ev["users"]),
                    model_metrics[name],
                    float(recorded),
                )
    decision = decide(name, model_metrics[name], pop_metrics[name], champion, policy, note)
    record = {**decision.to_dict(), "metric": name, "champion": asdict(champion) if champion else None}
    ctx.store.put(ctx.key(STAGE, "decision.json"), codecs.json_bytes(record))
    train_run = (ctx.read_result("train") or {}).get("mlflow_run_id")
    if train_run:
        tracking.set_tags(
            ctx,
            train_run,
            {"recsys.gate": "publish" if decision.publish else "reject", "recsys.gate_reason": decision.reason[:5000]},
        )
    table = "\n".join(f"  {'PASS' if c.passed else 'FAIL'} {c.name:<18} {c.detail}" for c in decision.checks)
    log.info("gate: %s\n%s", decision.reason, table)
    return ctx.write_result(STAGE, record)
