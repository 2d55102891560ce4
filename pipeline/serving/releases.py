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
from typing import Callable

import numpy as np

from pipeline import index as faiss_index
from pipeline import release as rel
from pipeline.embeddings import EmbeddedStore, UserStore
from pipeline.storage import ObjectStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LiveRelease:
    release: rel.Release
    index: object  # faiss.Index (search is thread-safe for reads)
    users: UserStore

    @property
    def release_id(self) -> str:
        return self.release.release_id

    def search(self, query: np.ndarray, k: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k item rows and scores for one query vector, excluded rows removed (still k if possible)."""
        n_items = len(self.release.item_ids)
        extra = 0 if exclude is None else len(exclude)
        want = min(k + extra, n_items)
        scores, ids = self.index.search(np.ascontiguousarray(query[None, :], dtype=np.float32), want)
        scores, ids = scores[0], ids[0]
        keep = ids >= 0
        if exclude is not None and len(exclude):
            keep &= ~np.isin(ids, exclude)
        return ids[keep][:k], scores[keep][:k]


class ReleaseCache:
    def __init__(
        self,
        store: ObjectStore,
        redis_users: UserStore | None,
        poll_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
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
        return (doc[0]["release_id"], EmbeddedStore()) if doc else None

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
            pointer = self._pointer(tenant)
            if pointer is None:
                return live
            rid, users = pointer
            if live is not None and live.release_id == rid and type(live.users) is type(users):
                return live
            try:
                loaded = rel.load_release(self.store, tenant, rid)
                new = LiveRelease(loaded, faiss_index.deserialize(loaded.index_bytes), users)
            except (rel.ReleaseError, FileNotFoundError, ValueError) as exc:
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
            return new

    def loaded(self) -> dict[str, str]:
        return {t: live.release_id for t, live in self._live.items()}
