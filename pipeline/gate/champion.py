"""Scoring the live release (the champion) on the challenger's fresh holdout, as serving would.

Both models rank the same users on held-out events at or after the champion's data cutoff,
with the same exclusions; users the champion does not know get its popularity list, items it
does not know cannot be ranked by it. A dot-product champion scores from its user and item
vectors; an item-item one (EASE, item-kNN) from its S and its own seen lists, as serving
does. See pipeline/gate/stage.py for how the gate uses this.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from pipeline.config.tenant import GateConfig
from pipeline.evaluation import metrics, ranking, scoring
from pipeline.features.dataset import Interactions, relevant_of
from pipeline.gate.policy import GroupRecall
from pipeline.models.itemitem import score_users
from pipeline.release import format as release


def item_groups(feats: Interactions, policy: GateConfig) -> dict[str, np.ndarray]:
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


def _champion_vectors(champ: release.Release, feats: Interactions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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


def _champion_top(champ: release.Release, feats: Interactions, rows: np.ndarray, k: int, exclude: sp.csr_matrix):
    """The champion's top-k for these user rows of the challenger's index space."""
    if champ.scoring == "dot":
        U, V, allowed = _champion_vectors(champ, feats)
        return ranking.topk_dot(U[rows], V, k, exclude=exclude, item_allowed=allowed)
    assert champ.similarity is not None
    S = champ.similarity
    urow = champ.user_ids.get_indexer(feats.users["user_id"].astype(str).to_numpy())[rows]
    irow = champ.item_ids.get_indexer(feats.items["item_id"].astype(str).to_numpy())
    allowed = irow >= 0
    X = champ.seen_matrix()[np.maximum(urow, 0)]
    unknown = (urow < 0) | (np.diff(X.indptr) == 0)  # as serving: nothing to score from, popular items
    X = sp.csr_matrix(sp.diags((~unknown).astype(np.float32)) @ X)
    pop = champ.item_popularity[irow[allowed]]
    pop = (pop / max(pop.max(), 1.0)).astype(np.float32) if len(pop) else pop.astype(np.float32)

    def scores(start: int, stop: int) -> np.ndarray:
        out = np.zeros((stop - start, feats.n_items), dtype=np.float32)
        known = score_users(X, S, np.arange(start, stop))[:, irow[allowed]]
        out[:, allowed] = np.where(unknown[start:stop, None], pop[None, :], known)
        return out

    return ranking.topk_scores(scores, len(rows), feats.n_items, k, exclude, allowed)


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
    feats: Interactions,
    challenger,
    champ: release.Release,
    k: int,
    metric: str,
    groups: dict[str, np.ndarray],
    max_users: int = 100_000,
) -> FreshComparison:
    """Both models ranked on the relevant held-out events at or after the champion's cutoff
    (at most `max_users` users, the same ones evaluate keeps: `scoring.sample_users`)."""
    cutoff = pd.Timestamp(champ.manifest["data_interval_end"])
    cutoff = cutoff.tz_convert("UTC").tz_localize(None) if cutoff.tzinfo else cutoff  # feats.timestamp is UTC
    after = feats.timestamp >= cutoff.to_datetime64()
    seen, held = feats.matrix(None), feats.matrix(True)
    fresh = relevant_of(held, feats.matrix(False)).multiply(feats.matrix(True, where=after)).tocsr()
    fresh.eliminate_zeros()
    fresh = scoring.sample_users(fresh, feats.users["user_id"], max_users)
    if fresh.nnz == 0:
        empty = np.zeros(0)
        return FreshComparison(empty.astype(np.int32), empty, empty, float("nan"), float("nan"), {})
    exclude = (seen - seen.multiply(fresh)).tocsr()
    exclude.eliminate_zeros()
    rows = np.flatnonzero(np.diff(fresh.indptr) > 0)
    ch = _ranked(scoring.topk(challenger, rows, k, exclude=exclude[rows]), rows, fresh)
    cp = _ranked(_champion_top(champ, feats, rows, k, exclude[rows]), rows, fresh)
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
