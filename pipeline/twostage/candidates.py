"""Stage one of the two-stage recommender: candidates from several sources, merged with their scores.

Why several sources: the model's own top items miss what a user's latest items point at and
what is popular among users like them; the ranker (stage two) can only reorder what some
source proposed. Each source proposes up to n items per user (seen items excluded) with a
score, best first; `merge` takes the union and keeps every source's score and rank per
(user, item) as ranker features, so a new source (say, a sequential model) is one entry in
`SOURCES` and one more column pair, nothing else.

Everything is computed a block of users at a time with dense numpy/scipy products: no loop
over users or items. Numpy and scipy only, so serving imports it without torch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import scipy.sparse as sp

from pipeline.models import itemitem
from pipeline.models.base import Recommender, TrainData

BLOCK_FLOATS = 1 << 22  # dense scores held per block of users (16 MiB of float32)
SECONDS_PER_DAY = 86_400.0


@dataclass(frozen=True)
class Proposals:
    """One source's lists for a batch of users: int64 item rows and float32 scores [users, n], best first;
    -1 / NaN where the source has fewer than n items for a user."""

    items: np.ndarray
    scores: np.ndarray


class Source(Protocol):
    name: str

    def propose(self, users: np.ndarray, n: int) -> Proposals: ...


@dataclass(frozen=True)
class Candidates:
    """The merged candidate set: one row per (user, item), grouped by user in input order.

    `user` indexes the `users` array given to `merge`; `sources` has, per source in order,
    its score (NaN: not proposed by it) and 1-based rank (n + 1: not proposed)."""

    user: np.ndarray  # int64 [m]
    item: np.ndarray  # int64 [m]
    sources: np.ndarray  # float32 [m, 2 * len(names)]
    names: tuple[str, ...]


def seen_newest_first(history: TrainData) -> tuple[np.ndarray, np.ndarray]:
    """Each user's distinct items, most recent first, as CSR (indptr, indices): the release's seen lists."""
    order = np.lexsort((-history.timestamp, history.user_idx))
    u, i = history.user_idx[order], history.item_idx[order]
    keys = u.astype(np.int64) * history.n_items + i
    _, first = np.unique(keys, return_index=True)
    keep = np.sort(first)  # the latest event of each (user, item), kept in (user, newest-first) order
    indptr = np.concatenate(([0], np.cumsum(np.bincount(u[keep], minlength=history.n_users))))
    return indptr.astype(np.int64), i[keep].astype(np.int64)


def top_n(dense: np.ndarray, n: int, floor: float) -> Proposals:
    """Best n per row of `dense` (float32, -inf = ineligible); scores <= floor are not proposed."""
    n = min(n, dense.shape[1])
    part = (
        np.argpartition(-dense, n - 1, axis=1)[:, :n] if n < dense.shape[1] else np.tile(np.arange(n), (len(dense), 1))
    )
    vals = np.take_along_axis(dense, part, axis=1)
    order = np.lexsort((part, -vals), axis=1)  # score desc, then item row: deterministic ties
    items = np.take_along_axis(part, order, axis=1).astype(np.int64)
    scores = np.take_along_axis(vals, order, axis=1).astype(np.float32)
    bad = ~(scores > floor)
    items[bad], scores[bad] = -1, np.nan
    return Proposals(items, scores)


class _DenseSource(ABC):
    """A source whose per-user scores over all items come as a dense block; seen items are masked."""

    name = ""
    floor = -np.inf

    def __init__(self, seen: sp.csr_matrix) -> None:
        self.seen = seen  # binary users x items

    @abstractmethod
    def scores(self, users: np.ndarray) -> np.ndarray:
        """float32 [len(users), n_items]: this source's score of every item for each user."""

    def propose(self, users: np.ndarray, n: int) -> Proposals:
        n_items = self.seen.shape[1]
        step = max(1, BLOCK_FLOATS // max(n_items, 1))
        parts = []
        for start in range(0, len(users), step):  # blocks of users: memory stays at step x n_items
            block = users[start : start + step]
            dense = np.array(self.scores(block), dtype=np.float32)
            mask = self.seen[block].tocoo()
            dense[mask.row, mask.col] = -np.inf
            parts.append(top_n(dense, n, self.floor))
        if not parts:
            return Proposals(np.empty((0, n), np.int64), np.empty((0, n), np.float32))
        return Proposals(np.concatenate([p.items for p in parts]), np.concatenate([p.scores for p in parts]))


class ModelSource(_DenseSource):
    """The fitted model's own ranking (dot product or X[u] @ S), as evaluation ranks it."""

    name = "model"

    def __init__(self, model: Recommender, seen: sp.csr_matrix) -> None:
        super().__init__(seen)
        self.model = model

    def scores(self, users: np.ndarray) -> np.ndarray:
        from pipeline.evaluation.scoring import user_scores

        return user_scores(self.model, users)


def recent_weights(indptr: np.ndarray, indices: np.ndarray, n_items: int, recent: int, decay: float) -> sp.csr_matrix:
    """users x items: each user's `recent` newest distinct items weighted decay**position (newest 1)."""
    lengths = np.diff(indptr)
    pos = np.arange(len(indices)) - np.repeat(indptr[:-1], lengths)
    keep = pos < recent
    rows = np.repeat(np.arange(len(lengths)), lengths)[keep]
    return sp.csr_matrix(
        ((decay ** pos[keep]).astype(np.float32), (rows, indices[keep])), shape=(len(lengths), n_items)
    )


class CoOccurrenceSource(_DenseSource):
    """Items that co-occur (cosine over users, each item's top neighbours kept) with the user's
    most recent items, newer items weighing more: what the user is into now."""

    name = "cooccurrence"
    floor = 0.0

    def __init__(self, similarity: sp.csr_matrix, recent: sp.csr_matrix, seen: sp.csr_matrix) -> None:
        super().__init__(seen)
        self.similarity, self.recent = similarity, recent

    def scores(self, users: np.ndarray) -> np.ndarray:
        return (self.recent[users] @ self.similarity).toarray()


def activity_segments(n_events: np.ndarray, buckets: int) -> tuple[np.ndarray, np.ndarray]:
    """(segment per user, bucket edges): users split into `buckets` quantiles of log activity."""
    edges = np.unique(np.quantile(np.log1p(n_events), np.linspace(0, 1, buckets + 1)[1:-1]))
    return np.searchsorted(edges, np.log1p(n_events), side="right").astype(np.int64), edges


class SegmentPopularitySource(_DenseSource):
    """What users in the same segment (activity bucket, or a stored attribute) chose lately:
    recency-weighted event counts per segment, normalised by the segment's size."""

    name = "segment_popularity"
    floor = 0.0

    def __init__(self, table: np.ndarray, segment: np.ndarray, seen: sp.csr_matrix) -> None:
        super().__init__(seen)
        self.table, self.segment = table, segment  # float32 [segments, items], int64 [users]

    def scores(self, users: np.ndarray) -> np.ndarray:
        return self.table[self.segment[users]]


def segment_table(history: TrainData, segment: np.ndarray, half_life_days: float) -> np.ndarray:
    """float32 [segments, items]: sum of 0.5**(age / half life) over the segment's events, per user."""
    age = (history.timestamp.max() - history.timestamp) / SECONDS_PER_DAY if len(history.timestamp) else 0.0
    w = np.power(0.5, age / half_life_days)
    n_seg = int(segment.max()) + 1 if len(segment) else 1
    seg_of_event = segment[history.user_idx]
    table = np.zeros((n_seg, history.n_items), dtype=np.float64)
    np.add.at(table, (seg_of_event, history.item_idx), w)
    size = np.bincount(segment, minlength=n_seg).astype(np.float64)
    return (table / np.maximum(size, 1.0)[:, None]).astype(np.float32)


def merge(proposals: dict[str, Proposals], n_items: int) -> Candidates:
    """Union of the sources' lists per user, each (user, item) once, with every source's score and rank."""
    names = tuple(proposals)
    keys, where = [], []
    for s, name in enumerate(names):
        p = proposals[name]
        r, c = np.nonzero(p.items >= 0)
        keys.append(r.astype(np.int64) * n_items + p.items[r, c])
        where.append((s, r, c))
    flat = np.concatenate(keys) if keys else np.empty(0, np.int64)
    uniq, inverse = np.unique(flat, return_inverse=True)
    feats = np.full((len(uniq), 2 * len(names)), np.nan, dtype=np.float32)
    start = 0
    for s, r, c in where:
        idx = inverse[start : start + len(r)]
        start += len(r)
        feats[:, 2 * s + 1] = proposals[names[s]].items.shape[1] + 1  # not proposed: one past its list
        feats[idx, 2 * s] = proposals[names[s]].scores[r, c]
        feats[idx, 2 * s + 1] = c + 1
    return Candidates(user=uniq // n_items, item=uniq % n_items, sources=feats, names=names)


# name -> builder(history, model, context) -> Source. A new source (e.g. a sequential model's
# next-item scores) registers here; its scores and ranks become ranker features by themselves.
SourceBuilder = Callable[["SourceContext"], Source]


@dataclass(frozen=True)
class SourceContext:
    """What sources are built from: the events they may see, the fitted model, and the knobs."""

    history: TrainData
    model: Recommender
    seen: sp.csr_matrix
    seen_indptr: np.ndarray
    seen_indices: np.ndarray
    recent_items: int
    recent_decay: float
    neighbours: int
    segments: int
    half_life_days: float


def _model(ctx: SourceContext) -> Source:
    return ModelSource(ctx.model, ctx.seen)


def item_similarity(history: TrainData, neighbours: int) -> sp.csr_matrix:
    """Cosine co-occurrence S (item-kNN's, each item's `neighbours` strongest kept)."""
    from pipeline.config.models import ItemKNNConfig
    from pipeline.models.itemknn import ItemKNN

    return ItemKNN(ItemKNNConfig(neighbours=neighbours, shrinkage=0.0)).fit(history).similarity()


def _cooccurrence(ctx: SourceContext) -> Source:
    n_items = ctx.history.n_items
    recent = recent_weights(ctx.seen_indptr, ctx.seen_indices, n_items, ctx.recent_items, ctx.recent_decay)
    return CoOccurrenceSource(item_similarity(ctx.history, ctx.neighbours), recent, ctx.seen)


def _segment_popularity(ctx: SourceContext) -> Source:
    segment, _ = activity_segments(np.diff(ctx.seen_indptr), ctx.segments)
    return SegmentPopularitySource(segment_table(ctx.history, segment, ctx.half_life_days), segment, ctx.seen)


SOURCES: dict[str, SourceBuilder] = {
    "model": _model,
    "cooccurrence": _cooccurrence,
    "segment_popularity": _segment_popularity,
}


def source_context(history: TrainData, model: Recommender, **knobs) -> SourceContext:
    indptr, indices = seen_newest_first(history)
    seen = itemitem.seen_matrix(indptr, indices, history.n_items)
    return SourceContext(history, model, seen, indptr, indices, **knobs)
