"""Each tenant's live release: its pointer re-read, a new release loaded and swapped in whole.

Split from live.py (what one release answers) because this is about WHICH release serves:
pointers (Redis first, then the artifact store), loads through `verify.load_servable` (what
publish verified before its flip), breakers around the store, and releases that failed to
load remembered so they are not downloaded again every poll. `loader.py` runs the polls.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from dataclasses import replace
from typing import Any, Callable

from pipeline.release import format as rel
from pipeline.release import verify
from pipeline.serving.breaker import Breaker, BreakerOpen, Unavailable, is_outage
from pipeline.serving.live import LiveRelease
from pipeline.serving.user_store import EmbeddedStore, UserStore
from pipeline.storage import ObjectStore

log = logging.getLogger(__name__)


class ReleaseCache:
    """Each tenant's live release; `poll` re-reads one tenant's pointer and swaps a new release in.

    Per-tenant locks: one tenant's slow pointer read or load never holds another's. Serving
    polls from per-tenant background tasks (`loader.py`); requests only read `current`. A
    release that fails to load (checksum, missing file, bad bytes) is remembered per
    (tenant, release id) and not re-read for `retry_seconds` unless the pointer moves; a
    store outage (timeouts, refused connections, the store breaker open) is not remembered:
    it is retried next poll. Either way the previous release keeps serving.
    """

    def __init__(
        self,
        store: ObjectStore,
        redis_users: UserStore | None,
        poll_seconds: float,
        clock: Callable[[], float] = time.monotonic,
        max_folded: int = 100_000,
        on_swap: Callable[[str, str | None, str], None] | None = None,
        retry_seconds: float = 600.0,
        store_breaker: Breaker | None = None,
        on_load_failure: Callable[[str, str], None] | None = None,
    ) -> None:
        self.max_folded = max_folded
        self.on_swap = on_swap
        self.on_load_failure = on_load_failure
        self.store = store
        self.redis_users = redis_users
        self.poll_seconds = poll_seconds
        self.retry_seconds = retry_seconds
        self.store_breaker = store_breaker
        self.clock = clock
        self._live: dict[str, LiveRelease] = {}
        self._checked: dict[str, float] = {}
        self._outcome: dict[str, str] = {}
        self._broken: dict[tuple[str, str], tuple[float, str]] = {}  # -> (when, the pointer then)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def current(self, tenant: str) -> LiveRelease | None:
        """What the tenant serves now (no I/O, no lock): the request path's only call."""
        return self._live.get(tenant)

    def outcome(self, tenant: str) -> str:
        """The last poll's word: loaded, absent (nothing published), unreachable, broken, or unknown."""
        return self._outcome.get(tenant, "unknown")

    def fresh(self, tenant: str) -> LiveRelease | None:
        """The live release if its pointer was checked within the poll period (no I/O, no lock)."""
        live = self._live.get(tenant)
        if live is not None and self.clock() - self._checked.get(tenant, -1e18) < self.poll_seconds:
            return live
        return None

    def get(self, tenant: str) -> LiveRelease | None:
        """The live release, polling first if the poll period has passed (synchronous)."""
        return self.fresh(tenant) or self.poll(tenant, only_if_due=True)

    def poll(self, tenant: str, only_if_due: bool = False) -> LiveRelease | None:
        with self._lock_of(tenant):
            if only_if_due and (live := self.fresh(tenant)) is not None:
                return live  # another thread polled while this one waited
            return self._poll(tenant)

    def _lock_of(self, tenant: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(tenant, threading.Lock())

    def _guarded(self, fn: Callable[..., Any], *args: Any) -> Any:
        """An object-store call through its breaker: an outage counts, a bad release does not."""
        b = self.store_breaker
        if b is not None and not b.allow():
            raise BreakerOpen("the object store's circuit breaker is open")
        try:
            out = fn(*args)
        except Exception as exc:
            if b is not None:
                b.failure() if is_outage(exc) else b.success()
            raise
        if b is not None:
            b.success()
        return out

    def _pointer(self, tenant: str, live: LiveRelease | None) -> tuple[str, UserStore, str | None, str] | None:
        """(release id, user store, degraded reason, pointer version) the tenant should serve, or None if
        nothing is published. The version (the pointer's etag) tells a re-flip to the same id apart."""
        degraded = None
        if self.redis_users is not None:
            try:
                rid = self.redis_users.current(tenant)
            except Unavailable:
                if live is not None:
                    raise  # Redis's pointer is unknown: keep what serves
                degraded = "redis_unavailable"  # cold start: the artifact store's pointer, release data only
            else:
                if rid:
                    return rid, self.redis_users, None, f"redis:{rid}"
        doc = self._guarded(rel.read_pointer, self.store, tenant)
        return (doc[0]["release_id"], EmbeddedStore(self.max_folded), degraded, doc[1]) if doc else None

    def _poll(self, tenant: str) -> LiveRelease | None:
        now = self.clock()
        self._checked[tenant] = now
        live = self._live.get(tenant)
        keeping = live.release_id if live else "nothing"
        try:
            pointer = self._pointer(tenant, live)
        except Exception as exc:  # damaged pointer, store or Redis down: keep what serves
            self._outcome[tenant] = "loaded" if live else "unreachable"
            # an open breaker is logged once when it opened (by the failing call), not every poll
            level = logging.ERROR
            if isinstance(exc, Unavailable):
                level = logging.DEBUG if isinstance(exc, BreakerOpen) else logging.WARNING
            log.log(level, "tenant %s: cannot read the release pointer (%s); keeping %s", tenant, exc, keeping)
            return live
        if pointer is None:
            self._outcome[tenant] = "loaded" if live else "absent"
            return live
        rid, users, degraded, version = pointer
        if live is not None and live.release_id == rid:
            if (type(live.users), live.degraded) != (type(users), degraded):  # same files, other user store
                self._live[tenant] = live = replace(live, users=users, degraded=degraded)
            return live
        failed = self._broken.get((tenant, rid))
        if failed is not None and failed[1] == version and now - failed[0] < self.retry_seconds:
            return live  # known unloadable: not re-read every poll (a pointer written anew is retried)
        try:
            # the load publish verified before its flip (release/verify.py): checksums, then the index
            servable = self._guarded(verify.load_servable, self.store, tenant, rid)
            new = LiveRelease(servable.release, servable.index, users, degraded)
        except Exception as exc:  # checksum, missing file, bad bytes, faiss: never swap to it
            outage = is_outage(exc)
            if not outage:
                self._broken[(tenant, rid)] = (now, version)
                if self.on_load_failure is not None:
                    self.on_load_failure(tenant, rid)
            self._outcome[tenant] = "loaded" if live else ("unreachable" if outage else "broken")
            log.error(
                "tenant %s: cannot load release %s (%s); keeping %s%s",
                tenant,
                rid,
                exc,
                keeping,
                "" if outage else f"; not tried again for {self.retry_seconds:.0f} s unless the pointer moves",
            )
            return live
        self._broken.pop((tenant, rid), None)
        self._live[tenant] = new
        self._outcome[tenant] = "loaded"
        # a release is long-lived: collect once, then move what survives out of the cyclic GC's
        # reach, so full collections during requests do not traverse it (benchmarks/serving:
        # p99 at 500 req/s 11.2 -> 8.4 ms, fewer 25-120 ms spikes); once per swap, in a loader thread
        gc.collect()
        gc.freeze()
        log.info("tenant %s: now serving release %s", tenant, rid)
        if self.on_swap is not None:
            self.on_swap(tenant, live.release_id if live else None, rid)
        return new

    def loaded(self) -> dict[str, str]:
        return {t: live.release_id for t, live in self._live.items()}
