"""Live releases for serving: loaded lazily, verified, swapped whole.

A request takes one `LiveRelease` reference and uses only it, so a swap in between never
mixes two releases in one response. A `LiveRelease` answers the questions routes ask (top
items, similar items, scores, reasons) the way its release scores: FAISS over user and item
vectors, or, for item-item releases (EASE, item-kNN), exact sums of rows of S over the
user's seen items (`models/itemitem.py`), ties going to the more popular item. Pointers are
re-read every `release_poll_seconds`, per tenant, off the request path (`loader.py`); a
release that fails its checksums is refused, remembered, and the old one keeps serving.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np
import scipy.sparse as sp

from pipeline.config.models import ALSConfig
from pipeline.index import search as ann
from pipeline.models import itemitem, registry
from pipeline.release import format as rel
from pipeline.serving import rerank
from pipeline.serving.user_store import UserData, UserStore

log = logging.getLogger(__name__)
_thread = threading.local()
REASON_SEEN_ITEMS = 200  # reasons by vector similarity look at the user's most recent items only


def _one_faiss_thread() -> None:
    """OpenMP's thread count is per thread: set it to 1 in every request thread, once.

    Parallelism comes from concurrent requests; a multi-threaded FAISS search inside a
    threadpool worker is slower than a 1-thread one, its threads fight the other requests'
    (benchmarks/serving measures it).
    """
    if not getattr(_thread, "faiss_single", False):
        import faiss

        faiss.omp_set_num_threads(1)
        _thread.faiss_single = True


@dataclass(frozen=True)
class LiveRelease:
    """One verified release plus its index and user store: everything a response may use.

    `degraded` names why the user store is not the one configured (Redis unreachable when the
    release was loaded: its own files serve the users); None when it is.
    """

    release: rel.Release
    index: object | None  # faiss.Index (search is thread-safe for reads); None for item-item releases
    users: UserStore
    degraded: str | None = None

    @property
    def release_id(self) -> str:
        return self.release.release_id

    @property
    def scoring(self) -> registry.Scoring:
        return self.release.scoring

    @property
    def similarity(self) -> sp.csr_matrix:
        assert self.release.similarity is not None, "a dot-product release has no similarity matrix"
        return self.release.similarity

    @cached_property
    def item_space(self) -> np.ndarray | sp.csr_matrix:
        """What items are compared by (MMR's cosine): item vectors, or the rows of S."""
        return self.release.item_vectors if self.scoring == "dot" else self.similarity

    @cached_property
    def item_id_array(self) -> np.ndarray:
        """Item ids as a numpy object array: responses gather ids with one fancy index."""
        return self.release.item_ids.to_numpy(dtype=object)

    @property
    def n_items(self) -> int:
        return len(self.release.item_ids)

    @cached_property
    def gram(self) -> np.ndarray:
        """Y^T Y of the item factors, for the fold-in's closed form."""
        y = self.release.item_vectors.astype(np.float64)
        return y.T @ y

    @cached_property
    def fold_in(self) -> registry.FoldIn | None:
        """How posted events update a user at once (the registry's word for the release's kind)."""
        return registry.fold_in(self.release.model_meta.get("kind", ""))

    @property
    def can_fold_in(self) -> bool:
        return self.fold_in is not None

    def personal(self, user: UserData) -> bool:
        """Whether the user's data can score items: any vector, or a non-empty seen list (item-item)."""
        return self.scoring == "dot" or len(user[1]) > 0

    @cached_property
    def fold_in_config(self) -> ALSConfig:
        """The trained model's config, typed once per release (the fold-in's terms come from it)."""
        return ALSConfig.model_validate(self.release.model_meta["config"])

    def row_of_user(self, user_id: str) -> int | None:
        """The user's row in the release (a hash lookup: ~100x cheaper than get_indexer on a list of one)."""
        try:
            row = self.release.user_ids.get_loc(user_id)
        except KeyError:
            return None
        return int(row) if isinstance(row, (int, np.integer)) else None  # duplicate ids (never written): a mask

    def row_of_item(self, item_id: str) -> int:
        """The item's row, -1 when unknown (as get_indexer, without its per-call cost)."""
        try:
            row = self.release.item_ids.get_loc(item_id)
        except KeyError:
            return -1
        return int(row) if isinstance(row, (int, np.integer)) else -1

    def rows_of(self, item_ids: list[str] | tuple[str, ...]) -> tuple[np.ndarray, list[str]]:
        """Item rows of known ids, and the ids this release does not know."""
        if not item_ids:
            return np.empty(0, dtype=np.int64), []
        rows = self.release.item_ids.get_indexer(list(item_ids))
        return rows[rows >= 0].astype(np.int64), [i for i, r in zip(item_ids, rows, strict=True) if r < 0]

    def allowed(self, filters: tuple[tuple[str, ...], ...]) -> np.ndarray | None:
        """Mask of items passing (category, exclude_category, tag, exclude_tag); cached per filter."""
        return self._allowed_cached(filters)

    @cached_property
    def _allowed_cached(self):
        r = self.release

        @lru_cache(maxsize=256)
        def compute(filters: tuple[tuple[str, ...], ...]) -> np.ndarray | None:
            category, exclude_category, tag, exclude_tag = filters
            mask = rerank.attribute_mask(
                len(r.item_ids),
                r.item_category,
                r.categories,
                r.item_tags,
                r.tags,
                category=category,
                exclude_category=exclude_category,
                tag=tag,
                exclude_tag=exclude_tag,
            )
            if mask is not None:
                mask.setflags(write=False)
            return mask

        return compute

    def search(
        self,
        queries: np.ndarray,
        k: int,
        exclude: list[np.ndarray] | None = None,
        allowed: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows and scores per query row, never fewer than k while enough items are eligible."""
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        _one_faiss_thread()
        return ann.search(self.index, self.release.item_vectors, q, k, exclude=exclude, allowed=allowed)

    def precomputed(
        self, user_id: str, user: UserData, k: int, excluded: np.ndarray, allowed: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """Top-k rows and scores from the release's per-user candidates (`candidates.npy`), exactly
        re-scored; None when the live search must answer: no such file, k wider than the list, the
        user's vector is not the release's (folded in since), or the filters leave too few."""
        table = self.release.candidates
        if table is None or k > table.shape[1]:
            return None
        row = self.row_of_user(user_id)
        if row is None or not np.array_equal(user[0], self.release.user_vectors[row]):
            return None
        rows = table[row]
        complete = rows[-1] < 0  # -1 padded: the list holds every item the user may get
        rows = rows[rows >= 0]
        if allowed is not None:
            rows = rows[allowed[rows]]
        if len(excluded):
            rows = rows[~np.isin(rows, excluded)]
        if len(rows) < k and not complete:
            return None
        scores = self.release.item_vectors[rows] @ user[0]
        order = np.lexsort((rows, -scores))[:k]  # score desc, then item row (as the exact search)
        return rows[order].astype(np.int64), scores[order]

    def top_items(
        self, users: list[UserData], k: int, exclude: list[np.ndarray], allowed: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows and scores [len(users), k] (-1 / -inf padded) for these users' data."""
        if self.scoring == "dot":
            return self.search(np.stack([u[0] for u in users]), k, exclude=exclude, allowed=allowed)
        lengths = np.array([len(u[1]) for u in users], dtype=np.int64)
        indptr = np.concatenate(([0], np.cumsum(lengths)))
        X = itemitem.seen_matrix(indptr, np.concatenate([u[1] for u in users]), self.n_items)
        rows = np.empty((len(users), k), dtype=np.int64)
        scores = np.empty((len(users), k), dtype=np.float32)
        step = max(1, ann.SCORE_CHUNK // max(self.n_items, 1))  # bounds the dense block of scores
        for start in range(0, len(users), step):  # blocks of the request's users
            stop = min(start + step, len(users))
            dense = itemitem.score_users(X, self.similarity, np.arange(start, stop))
            rows[start:stop], scores[start:stop] = self._top(dense, k, exclude[start:stop], allowed)
        return rows, scores

    def similar_items(
        self, row: int, k: int, exclude: np.ndarray, allowed: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k items like item `row` (1-d rows and scores, -1 / -inf padded), the item itself excluded."""
        exclude = np.concatenate(([row], exclude)).astype(np.int64)
        if self.scoring == "dot":
            rows, scores = self.search(self.release.item_vectors[row], k, exclude=[exclude], allowed=allowed)
        else:  # S's row: what having seen `row` adds to every item's score
            rows, scores = self._top(self.similarity[row].toarray(), k, [exclude], allowed)
        return rows[0], scores[0]

    def precomputed_neighbors(
        self, row: int, k: int, exclude: np.ndarray, allowed: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """`similar_items` from the release's `neighbors.npy`: exactly re-scored, padded as the
        search pads; None when the live search must answer (no such file, k wider than the
        list, or the filters leave too few)."""
        table = self.release.neighbors
        if table is None or k > table.shape[1]:
            return None
        rows = table[row]
        complete = rows[-1] < 0  # -1 padded: the list holds every other item
        rows = rows[rows >= 0]
        if allowed is not None:
            rows = rows[allowed[rows]]
        if len(exclude):
            rows = rows[~np.isin(rows, exclude)]
        if len(rows) < k and not complete:
            return None
        item_vectors = self.release.item_vectors
        scores = item_vectors[rows] @ item_vectors[row]
        order = np.lexsort((rows, -scores))[:k]  # score desc, then item row (as the exact search)
        out_rows = np.full(k, -1, dtype=np.int64)
        out_scores = np.full(k, -np.inf, dtype=np.float32)
        out_rows[: len(order)], out_scores[: len(order)] = rows[order], scores[order]
        return out_rows, out_scores

    def scores_of(self, user: UserData, rows: np.ndarray) -> np.ndarray:
        """float32 scores of the given item rows for one user (the rank route)."""
        if self.scoring == "dot":
            return self.release.item_vectors[rows] @ user[0]
        return itemitem.score_seen(self.similarity, user[1])[rows]

    def reasons(self, rec_rows: np.ndarray, seen: np.ndarray) -> np.ndarray:
        """Per recommended item, the seen item behind it (-1: none): the closest seen item by
        cosine of item vectors, or for item-item releases the seen item adding most to its score."""
        if self.scoring == "dot":
            return rerank.reasons(rec_rows, seen[:REASON_SEEN_ITEMS], self.release.item_vectors)
        return rerank.strongest_contributor(rec_rows, seen, self.similarity)

    def _top(
        self, dense: np.ndarray, k: int, exclude: list[np.ndarray], allowed: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k per row of dense scores, after the filter mask and each row's exclusions."""
        if allowed is not None:
            dense[:, ~allowed] = -np.inf
        excl = [np.asarray(e, dtype=np.int64) for e in exclude]
        dense[np.repeat(np.arange(len(excl)), [len(e) for e in excl]), np.concatenate(excl)] = -np.inf
        return itemitem.top_k(dense, k, self.release.popularity_rank)
