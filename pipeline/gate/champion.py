"""Scoring the live release (the champion) on the challenger's fresh holdout, as serving would.

Both models rank the same users on held-out events at or after the champion's data cutoff,
with the same exclusions; users the champion does not know get its popularity list, items it
does not know cannot be ranked by it. See pipeline/gate/stage.py for how the gate uses this.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from pipeline.config.tenant import GateConfig
from pipeline.evaluation import metrics, ranking, scoring
from pipeline.features.dataset import Features
from pipeline.gate.policy import GroupRecall
from pipeline.release import format as release


def item_groups(feats: Features, policy: GateConfig) -> dict[str, np.ndarray]:
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


def _ranked(top: np.ndarray, rows: np.ndarray, relevant: sp.csr_matrix) -> _Ranked:
    hits = metrics.hits_matrix(top, rows, relevant)
    return _Ranked(rows, top, hits, metrics.per_user_metrics(hits, np.diff(relevant.indptr)[rows]))


def _champion_vectors(champ: release.Release, feats: Features) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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
    feats: Features,
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
    rows = np.flatnonzero(np.diff(fresh.indptr) > 0)
    ch = _ranked(scoring.topk(challenger, rows, k, exclude=exclude[rows]), rows, fresh)
    U, V, allowed = _champion_vectors(champ, feats)
    cp = _ranked(ranking.topk_dot(U[rows], V, k, exclude=exclude[rows], item_allowed=allowed), rows, fresh)
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
