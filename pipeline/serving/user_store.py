"""Where serving reads per-user data of a release: Redis (versioned keys) or the release itself.

The Redis key layout is pipeline/storage/redis.py. The refresh never touches the fold-in keys,
so rerunning it stays idempotent; they expire with their release. Values are checked (length,
finite numbers, item range) before use, by both stores: a malformed value is reported as
invalid user data, never interpreted. Both run one contract suite (tests/contracts/user_store.py).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Callable, Protocol, TypeVar

import numpy as np
from starlette.concurrency import run_in_threadpool

from pipeline.release.format import Release
from pipeline.serving.breaker import Breaker, BreakerOpen, Unavailable, is_outage
from pipeline.storage.redis import key

log = logging.getLogger(__name__)
T = TypeVar("T")
UserData = tuple[np.ndarray, np.ndarray]  # (float32 vector, int32 seen item rows, newest first)
# Folded-in users live until the next release replaces them; the TTL only bounds keys written
# to a release that a lagging server still used after the pointer flipped.
FOLD_TTL_SECONDS = 7 * 86_400


class InvalidUserData(ValueError):
    """Stored user data of the wrong size or range: refused, the user is served the fallback."""


def decode_user(release: Release, user_id: str, vec: bytes, seen: bytes | None) -> UserData:
    """float32 vector + int32 item indices from raw bytes, checked against the release."""
    dim = release.item_vectors.shape[1]
    if len(vec) != dim * 4:
        raise InvalidUserData(f"user {user_id!r}: vector has {len(vec)} bytes, expected {dim * 4} (float32 x {dim})")
    seen = seen or b""
    if len(seen) % 4:
        raise InvalidUserData(f"user {user_id!r}: seen list has {len(seen)} bytes, not a multiple of 4 (int32)")
    return checked(release, user_id, np.frombuffer(vec, dtype=np.float32), np.frombuffer(seen, dtype=np.int32))


def checked(release: Release, user_id: str, vector: np.ndarray, rows: np.ndarray) -> UserData:
    """The user's data if the numbers are usable for `release` (finite, items in range)."""
    if not np.isfinite(vector).all():
        raise InvalidUserData(f"user {user_id!r}: vector has non-finite values")
    if len(rows) and (rows.min() < 0 or rows.max() >= len(release.item_ids)):
        raise InvalidUserData(f"user {user_id!r}: seen item index out of range for release {release.release_id}")
    return vector, rows


class UserStore(Protocol):
    def current(self, tenant: str) -> str | None:
        """The release this store holds live for the tenant, or None: the artifact store's pointer decides."""

    def user(self, release: Release, user_id: str) -> UserData | None:
        """(vector, seen item indices newest first) of a known user, or None; InvalidUserData if corrupt."""

    def users(self, release: Release, user_ids: list[str]) -> list[UserData | None | InvalidUserData]:
        """`user` for many users in one round trip; a corrupt entry comes back as its InvalidUserData."""

    def fold(self, release: Release, user_id: str, vector: np.ndarray, seen: np.ndarray) -> None:
        """Store a user's vector folded in from new events (until the next release)."""


class EmbeddedStore:
    """No Redis: the release files are the store, plus an in-process LRU of folded-in users.

    Fine for one process; with several workers use Redis, so every worker sees a fold-in.
    """

    def __init__(self, max_folded: int = 100_000) -> None:
        self.max_folded = max_folded
        self._folded: OrderedDict[str, UserData] = OrderedDict()
        self._lock = threading.Lock()

    def current(self, tenant: str) -> str | None:
        return None  # the artifact store's pointer decides

    def user(self, release: Release, user_id: str) -> UserData | None:
        with self._lock:
            folded = self._folded.get(user_id)
        if folded is not None:
            return checked(release, user_id, *folded)
        try:  # a hash lookup: get_indexer on a one-id list costs ~100x more (pandas 3)
            row = release.user_ids.get_loc(user_id)
        except KeyError:
            return None
        return checked(release, user_id, release.user_vectors[row], release.seen(row))

    def users(self, release: Release, user_ids: list[str]) -> list[UserData | None | InvalidUserData]:
        out: list[UserData | None | InvalidUserData] = []
        for u in user_ids:  # per user of one request, not per item
            try:
                out.append(self.user(release, u))
            except InvalidUserData as exc:
                out.append(exc)
        return out

    def fold(self, release: Release, user_id: str, vector: np.ndarray, seen: np.ndarray) -> None:
        if self.max_folded <= 0:
            return
        with self._lock:
            self._folded[user_id] = (vector.astype(np.float32), seen.astype(np.int32))
            self._folded.move_to_end(user_id)
            while len(self._folded) > self.max_folded:
                self._folded.popitem(last=False)


class RedisStore:
    def __init__(self, client, prefix: str) -> None:
        self.r = client
        self.prefix = prefix

    def current(self, tenant: str) -> str | None:
        value = self.r.get(key(self.prefix, tenant, "current"))
        return value.decode() if value else None

    def _keys(self, release: Release, user_id: str) -> list[str]:
        return [
            key(self.prefix, release.tenant, release.release_id, part, user_id) for part in ("fu", "fseen", "u", "seen")
        ]

    @staticmethod
    def _decode(release: Release, user_id: str, values: list[bytes | None]):
        fu, fseen, vec, seen = values
        if fu is not None:
            return decode_user(release, user_id, fu, fseen)
        if vec is None:
            return None
        return decode_user(release, user_id, vec, seen)

    def user(self, release: Release, user_id: str) -> UserData | None:
        return self._decode(release, user_id, self.r.mget(self._keys(release, user_id)))

    def users(self, release: Release, user_ids: list[str]) -> list[UserData | None | InvalidUserData]:
        values = self.r.mget([k for u in user_ids for k in self._keys(release, u)]) if user_ids else []
        return self._decode_all(release, user_ids, values)

    @classmethod
    def _decode_all(
        cls, release: Release, user_ids: list[str], values: list[bytes | None]
    ) -> list[UserData | None | InvalidUserData]:
        """One MGET's values (4 keys per user) decoded per user; a bad value is that user's error."""
        out: list[UserData | None | InvalidUserData] = []
        for i, u in enumerate(user_ids):  # per user of one request, not per item
            try:
                out.append(cls._decode(release, u, values[4 * i : 4 * i + 4]))
            except InvalidUserData as exc:
                out.append(exc)
        return out

    def fold(self, release: Release, user_id: str, vector: np.ndarray, seen: np.ndarray) -> None:
        pipe = self.r.pipeline(transaction=True)  # vector and seen list change together
        k = lambda part: key(self.prefix, release.tenant, release.release_id, part, user_id)  # noqa: E731
        pipe.set(k("fu"), vector.astype(np.float32).tobytes(), ex=FOLD_TTL_SECONDS)
        pipe.set(k("fseen"), seen.astype(np.int32).tobytes(), ex=FOLD_TTL_SECONDS)
        pipe.execute()


class ResilientRedisStore(RedisStore):
    """RedisStore behind a circuit breaker, falling back to the release's own files.

    Serving's Redis client has timeouts of tens of milliseconds and no retry
    (`storage.redis.serving_redis_client`). When Redis refuses, times out or its breaker is
    open, reads answer from the release files (the users the release holds, personalised;
    fold-ins since the release are not seen) and say they are degraded; the pointer read and
    fold-ins raise `Unavailable` for their caller to decide. A subclass, so everything that
    asks "is this the Redis store" (tests, the release cache) still gets yes.

    The async hot routes (recommendations) read through `aread_users` on the redis.asyncio
    twin client (same timeouts, same breaker); everything else reads synchronously in
    Starlette's threadpool. The benchmark measured the whole route 43% cheaper in server CPU
    that way (benchmarks/serving: 2.07 -> 1.18 ms per request): the threadpool hop, not the
    read, was the cost (`benchmarks/redis_read.py` timed the read alone).
    """

    def __init__(self, client, prefix: str, breaker: Breaker, aclient=None) -> None:
        super().__init__(client, prefix)
        self.breaker = breaker
        self.aclient = aclient  # redis.asyncio twin of `client` for `aread_users` (None: reads go sync)
        self.files = EmbeddedStore(max_folded=0)  # the release's own rows; no in-process fold-ins

    def _call(self, fn: Callable[..., T], *args) -> T:
        if not self.breaker.allow():
            raise BreakerOpen("redis: circuit breaker open")
        try:
            out = fn(*args)
        except Exception as exc:
            if is_outage(exc):
                self.breaker.failure()
                raise Unavailable(f"redis: {type(exc).__name__}: {exc}") from exc
            self.breaker.success()  # Redis answered (e.g. a malformed value): not an outage
            raise
        self.breaker.success()
        return out

    def current(self, tenant: str) -> str | None:
        return self._call(super().current, tenant)

    def read_users(
        self, release: Release, user_ids: list[str]
    ) -> tuple[list[UserData | None | InvalidUserData], str | None]:
        """`users`, and why they came from the release files instead of Redis (None: from Redis).

        A user Redis does not have but the release does means Redis lost its keys (restarted
        empty, evicted): the refresh writes every user of a release. Their release row
        serves, degraded, until the next poll sees the pointer gone too.
        """
        try:
            got = self._call(super().users, release, user_ids)
        except Unavailable as exc:
            return self._from_files(release, user_ids, exc)
        return self._resolve(release, user_ids, got)

    async def aread_users(
        self, release: Release, user_ids: list[str]
    ) -> tuple[list[UserData | None | InvalidUserData], str | None]:
        """`read_users` over the redis.asyncio client, for routes running on the event loop: the
        same breaker, timeouts and degraded answers, without a threadpool hop per request."""
        if not self.breaker.allow():
            return self._from_files(release, user_ids, BreakerOpen("redis: circuit breaker open"))
        keys = [k for u in user_ids for k in self._keys(release, u)]
        try:
            values = await self.aclient.mget(keys) if keys else []
        except Exception as exc:
            if not is_outage(exc):
                self.breaker.success()  # Redis answered: not an outage
                raise
            self.breaker.failure()
            return self._from_files(release, user_ids, Unavailable(f"redis: {type(exc).__name__}: {exc}"))
        self.breaker.success()
        return self._resolve(release, user_ids, self._decode_all(release, user_ids, values))

    def _from_files(
        self, release: Release, user_ids: list[str], exc: Unavailable
    ) -> tuple[list[UserData | None | InvalidUserData], str]:
        reason = "redis_breaker_open" if isinstance(exc, BreakerOpen) else "redis_unavailable"
        log.debug("tenant %s: %s; answering from release %s", release.tenant, exc, release.release_id)
        return self.files.users(release, user_ids), reason

    def _resolve(
        self, release: Release, user_ids: list[str], got: list[UserData | None | InvalidUserData]
    ) -> tuple[list[UserData | None | InvalidUserData], str | None]:
        """Users Redis lacks but the release holds: Redis lost its keys (degraded, see `read_users`)."""
        missing = [j for j, u in enumerate(got) if u is None]
        if not missing:
            return got, None
        rows = release.user_ids.get_indexer([user_ids[j] for j in missing])
        lost = [j for j, row in zip(missing, rows, strict=True) if row >= 0]
        if not lost:  # unknown to the release as well: a cold user, not a degraded answer
            return got, None
        for j, u in zip(lost, self.files.users(release, [user_ids[j] for j in lost]), strict=True):
            got[j] = u
        return got, "redis_lost_users"

    def users(self, release: Release, user_ids: list[str]) -> list[UserData | None | InvalidUserData]:
        return self.read_users(release, user_ids)[0]

    def user(self, release: Release, user_id: str) -> UserData | None:
        got = self.read_users(release, [user_id])[0][0]
        if isinstance(got, InvalidUserData):
            raise got
        return got

    def fold(self, release: Release, user_id: str, vector: np.ndarray, seen: np.ndarray) -> None:
        self._call(super().fold, release, user_id, vector, seen)


def read_users(
    users: UserStore, release: Release, user_ids: list[str], degraded: str | None = None
) -> tuple[list[UserData | None | InvalidUserData], str | None]:
    """Any store's `users`, with the reason the answer is degraded (None: it is not)."""
    if isinstance(users, ResilientRedisStore):
        got, reason = users.read_users(release, user_ids)
        return got, reason or degraded
    return users.users(release, user_ids), degraded


async def aread_users(
    users: UserStore, release: Release, user_ids: list[str], degraded: str | None = None
) -> tuple[list[UserData | None | InvalidUserData], str | None]:
    """`read_users` for a route on the event loop: Redis through redis.asyncio, or (no async
    client) the sync read in a thread; an embedded store (no network) answers inline."""
    if isinstance(users, ResilientRedisStore):
        if users.aclient is not None:
            got, reason = await users.aread_users(release, user_ids)
        else:
            got, reason = await run_in_threadpool(users.read_users, release, user_ids)
        return got, reason or degraded
    if isinstance(users, EmbeddedStore):
        return users.users(release, user_ids), degraded
    return await run_in_threadpool(read_users, users, release, user_ids, degraded)
