"""The two-stage recommender: candidates from several sources, reordered by a learned ranker.

Fitting never looks at a holdout: it is given the events it may learn from (the train split
in `train`, every event in `refit`), carves the last `validation_fraction` of each user's
events off THOSE, fits the model and the sources on the rest, and teaches the ranker to put
the carved-off items first among the candidates. Then the sources are rebuilt on all the
given events (with the model fitted on them) for recommending, as serving does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import scipy.sparse as sp

from pipeline.config.twostage import TwoStageConfig
from pipeline.evaluation import metrics
from pipeline.features.dataset import Features, temporal_holdout
from pipeline.models.base import Recommender, TrainData
from pipeline.twostage import candidates as cg
from pipeline.twostage import features as tf
from pipeline.twostage.ranker import Ranker


def subset(data: TrainData, mask: np.ndarray) -> TrainData:
    return replace(
        data,
        user_idx=data.user_idx[mask],
        item_idx=data.item_idx[mask],
        timestamp=data.timestamp[mask],
        rating=data.rating[mask],
    )


def carve(history: TrainData, fraction: float) -> tuple[TrainData, sp.csr_matrix]:
    """(the events to fit on, the items to find): the last `fraction` of each user's events
    become targets, minus pairs the user already had before them."""
    held = temporal_holdout(history.user_idx, history.timestamp, history.item_idx, fraction)
    shape = (history.n_users, history.n_items)
    fit = subset(history, ~held)
    seen = sp.csr_matrix((np.ones(int((~held).sum()), np.float32), (fit.user_idx, fit.item_idx)), shape=shape)
    target = sp.csr_matrix(
        (np.ones(int(held.sum()), np.float32), (history.user_idx[held], history.item_idx[held])), shape=shape
    )
    target.sum_duplicates()
    target.data[:] = 1.0
    target = target - target.multiply(seen.astype(bool).astype(np.float32))
    target.eliminate_zeros()
    return fit, sp.csr_matrix(target)


@dataclass
class TwoStage:
    """Sources and statistics built on one history, the model fitted on it, and a fitted ranker."""

    config: TwoStageConfig
    ranker: Ranker
    sources: dict[str, cg.Source]
    stats: tf.Stats

    @classmethod
    def build(cls, config: TwoStageConfig, ranker: Ranker, history: TrainData, model: Recommender) -> TwoStage:
        ctx = cg.source_context(history, model, **config.knobs())
        sources = {name: cg.SOURCES[name](ctx) for name in config.sources}
        return cls(config, ranker, sources, tf.compute(history))

    def candidates(self, users: np.ndarray) -> tuple[cg.Candidates, np.ndarray]:
        """The merged candidates of `users` and their feature matrix."""
        props = {name: src.propose(users, self.config.sources[name]) for name, src in self.sources.items()}
        cands = cg.merge(props, len(self.stats.item))
        return cands, tf.matrix(cands, users, self.stats)

    def recommend(self, users: np.ndarray, k: int, block: int = 4096) -> np.ndarray:
        """int64 [len(users), k] item rows, best first by the ranker; -1 where fewer candidates.
        Blocks of users: memory stays at one block's candidates and features."""
        users = np.asarray(users, dtype=np.int64)
        out = np.full((len(users), k), -1, dtype=np.int64)
        for start in range(0, len(users), block):
            part = users[start : start + block]
            cands, X = self.candidates(part)
            out[start : start + len(part)] = top_k_per_user(
                cands.user, cands.item, self.ranker.predict(X), len(part), k
            )
        return out


def top_k_per_user(user: np.ndarray, item: np.ndarray, score: np.ndarray, n_users: int, k: int) -> np.ndarray:
    """Best k items per user from flat (user, item, score) rows: score desc, then item row."""
    order = np.lexsort((item, -score, user))
    u = user[order]
    starts = np.concatenate(([0], np.cumsum(np.bincount(u, minlength=n_users))[:-1]))
    pos = np.arange(len(u)) - starts[u]
    keep = pos < k
    out = np.full((n_users, k), -1, dtype=np.int64)
    out[u[keep], pos[keep]] = item[order][keep]
    return out


def training_set(
    config: TwoStageConfig, history: TrainData, make_model: Callable[[TrainData], Recommender]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str], dict]:
    """(X, labels, group sizes, feature names, counts) for the ranker, from `history` alone."""
    fit, target = carve(history, config.validation_fraction)
    model = make_model(fit)
    stage = TwoStage.build(config, ranker=None, history=fit, model=model)  # type: ignore[arg-type]
    users = np.flatnonzero(np.diff(target.indptr) > 0)
    if len(users) > config.max_training_users:  # a seeded sample bounds the rows (users x candidates)
        rng = np.random.default_rng(config.ranker.seed)
        users = np.sort(rng.choice(users, config.max_training_users, replace=False))
    cands, X = stage.candidates(users)
    keys = users[cands.user] * history.n_items + cands.item
    tc = target.tocoo()
    y = np.isin(keys, tc.row.astype(np.int64) * history.n_items + tc.col).astype(np.float32)
    # only users with a target among their candidates teach the ranker anything
    positives = np.bincount(cands.user, weights=y, minlength=len(users))
    keep = positives[cands.user] > 0
    sizes = np.bincount(cands.user[keep], minlength=len(users))
    counts = {
        "users": int(len(users)),
        "users_with_targets": int((np.diff(target.indptr) > 0).sum()),
        "users_with_target_in_candidates": int((positives > 0).sum()),
        "target_pairs": int(target[users].nnz),
        "candidate_recall": round(float(y.sum() / max(target[users].nnz, 1)), 4),
        "candidates_per_user": round(float(len(y) / max(len(users), 1)), 1),
    }
    return X[keep], y[keep], sizes[sizes > 0], tf.names(tuple(config.sources)), counts


def fit(config: TwoStageConfig, history: TrainData, make_model: Callable[[TrainData], Recommender]) -> Ranker:
    """The ranker learned from `history` only (see the module docstring)."""
    X, y, sizes, names, counts = training_set(config, history, make_model)
    if not len(sizes):
        raise ValueError("two_stage: no user has a carved-off item among their candidates; nothing to learn")
    ranker = Ranker.train(X, y, sizes, names, config.ranker)
    ranker.report |= counts
    return ranker


def evaluate(
    stage: TwoStage, relevant: sp.csr_matrix, k: int
) -> tuple[dict[str, float], dict[str, np.ndarray], np.ndarray]:
    """(summary, per-user metrics, user rows) on `relevant`, as evaluation.scoring reports a model."""
    rows = np.flatnonzero(np.diff(relevant.indptr) > 0)
    top = stage.recommend(rows, k)
    hits = metrics.hits_matrix(top, rows, relevant)
    per_user = metrics.per_user_metrics(hits, np.diff(relevant.indptr)[rows])
    return metrics.summarize(per_user, top, relevant.shape[1]), per_user, rows


def fit_train_split(
    config: TwoStageConfig, feats: Features, item_features, make_model: Callable[[TrainData], Recommender]
) -> Ranker:
    """The ranker a run judges: learned from the train split's events only (never the holdout)."""
    history = TrainData.from_events(feats.split(False), feats.n_users, feats.n_items, item_features)
    return fit(config, history, make_model)
