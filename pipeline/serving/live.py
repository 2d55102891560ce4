"""Live releases for serving: loaded lazily, verified, swapped whole.

A request takes one `LiveRelease` reference and uses only it, so a swap in between never
mixes two releases in one response. Pointers are re-read at most every
`release_poll_seconds`; a release that fails its checksums is refused and the old one
keeps serving.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Callable

import numpy as np

from pipeline.config.models import ALSConfig
from pipeline.index import search as ann
from pipeline.models import registry
from pipeline.release import format as rel
from pipeline.serving import rerank
from pipeline.serving.user_store import EmbeddedStore, UserStore
from pipeline.storage import ObjectStore

log = logging.getLogger(__name__)
_thread = threading.local()


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
    """One verified release plus its index and user store: everything a response may use."""

    release: rel.Release
    index: object  # faiss.Index (search is thread-safe for reads)
    users: UserStore

    @property
    def release_id(self) -> str:
        return self.release.release_id

    @property
    def n_items(self) -> int:
        return len(self.release.item_ids)

    @cached_property
    def gram(self) -> np.ndarray:
        """Y^T Y of the item factors, for the fold-in's closed form."""
        y = self.release.item_vectors.astype(np.float64)
        return y.T @ y

    @cached_property
    def can_fold_in(self) -> bool:
        return registry.folds_in(self.release.model_meta.get("kind", ""))

    @cached_property
    def fold_in_config(self) -> ALSConfig:
        """The trained model's config, typed once per release (the fold-in's terms come from it)."""
        return ALSConfig.model_validate(self.release.model_meta["config"])

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


class ReleaseCache:
    def __init__(
        self,
        store: ObjectStore,
        redis_users: UserStore | None,
        poll_seconds: float,
        clock: Callable[[], float] = time.monotonic,
        max_folded: int = 100_000,
        on_swap: Callable[[str, str | None, str], None] | None = None,
    ) -> None:
        self.max_folded = max_folded
        self.on_swap = on_swap
        self.store = store
        self.redis_users = redis_users
        self.poll_seconds = poll_seconds
        self.clock = clock
        self._live: dict[str, LiveRelease] = {}
        self._checked: dict[str, float] = {}
        self._lock = threading.Lock()

    def _pointer(self, tenant: str) -> tuple[str, UserStore] | None:
        if self.redis_users is not None:
            rid = self.redis_users.current(tenant)
            if rid:
                return rid, self.redis_users
        doc = rel.read_pointer(self.store, tenant)
        return (doc[0]["release_id"], EmbeddedStore(self.max_folded)) if doc else None

    def fresh(self, tenant: str) -> LiveRelease | None:
        """The live release if its pointer was checked within the poll period (no I/O, no lock)."""
        live = self._live.get(tenant)
        if live is not None and self.clock() - self._checked.get(tenant, -1e18) < self.poll_seconds:
            return live
        return None

    def get(self, tenant: str) -> LiveRelease | None:
        now = self.clock()
        live = self._live.get(tenant)
        if live is not None and now - self._checked.get(tenant, -1e18) < self.poll_seconds:
            return live
        with self._lock:  # one loader at a time; readers keep using the old reference meanwhile
            live = self._live.get(tenant)
            if live is not None and now - self._checked.get(tenant, -1e18) < self.poll_seconds:
                return live
            self._checked[tenant] = now
            try:
                pointer = self._pointer(tenant)
            except Exception as exc:  # damaged pointer, store or Redis down: keep what serves
                log.error(
                    "tenant %s: cannot read the release pointer (%s); keeping %s",
                    tenant,
                    exc,
                    live.release_id if live else "nothing",
                )
                return live
            if pointer is None:
                return live
            rid, users = pointer
            if live is not None and live.release_id == rid and type(live.users) is type(users):
                return live
            try:
                loaded = rel.load_release(self.store, tenant, rid)
                new = LiveRelease(loaded, ann.deserialize(loaded.index_bytes, loaded.manifest.get("index")), users)
            except Exception as exc:  # checksum, missing file, bad bytes, faiss: never swap to it
                log.error(
                    "tenant %s: cannot load release %s (%s); keeping %s",
                    tenant,
                    rid,
                    exc,
                    live.release_id if live else "nothing",
                )
                return live
            self._live[tenant] = new
            log.info("tenant %s: now serving release %s", tenant, rid)
            if self.on_swap is not None:
                self.on_swap(tenant, live.release_id if live else None, rid)
            return new

    def loaded(self) -> dict[str, str]:
        return {t: live.release_id for t, live in self._live.items()}
