"""Where serving reads per-user data of a release: Redis (versioned keys) or the release itself.

Redis layout (DESIGN.md), all values binary, never pickle:
  {prefix}:{tenant}:current                  -> release id (flipped last, atomically)
  {prefix}:{tenant}:{release}:u:{user_id}    -> float32 user vector
  {prefix}:{tenant}:{release}:seen:{user_id} -> int32 item indices of the release
  {prefix}:{tenant}:{release}:popular        -> int32 item indices, most popular first
  {prefix}:{tenant}:{release}:meta           -> hash: users, dim, complete=1 (written last)
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from pipeline.release import Release


def key(prefix: str, tenant: str, *parts: str) -> str:
    return ":".join((prefix, tenant, *parts))


# Compare-and-set of the tenant pointer: Redis 7 has no SET IFEQ, so a tiny Lua script.
FLIP_SCRIPT = """
local cur = redis.call('GET', KEYS[1])
if cur == false then cur = '' end
if cur ~= ARGV[2] then return {0, cur} end
redis.call('SET', KEYS[1], ARGV[1])
return {1, cur}
"""


class UserStore(Protocol):
    def current(self, tenant: str) -> str | None: ...

    def user(self, release: Release, user_id: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(vector, seen item indices) of a known user, or None."""


class EmbeddedStore:
    """No Redis: the release files are the store (fine for one process, small tenants)."""

    def current(self, tenant: str) -> str | None:
        return None  # the artifact store's pointer decides

    def user(self, release: Release, user_id: str) -> tuple[np.ndarray, np.ndarray] | None:
        row = release.user_ids.get_indexer([user_id])[0]
        if row < 0:
            return None
        return release.user_vectors[row], release.seen(row)


class RedisStore:
    def __init__(self, client, prefix: str) -> None:
        self.r = client
        self.prefix = prefix

    def current(self, tenant: str) -> str | None:
        value = self.r.get(key(self.prefix, tenant, "current"))
        return value.decode() if value else None

    def user(self, release: Release, user_id: str) -> tuple[np.ndarray, np.ndarray] | None:
        vec, seen = self.r.mget(
            key(self.prefix, release.tenant, release.release_id, "u", user_id),
            key(self.prefix, release.tenant, release.release_id, "seen", user_id),
        )
        if vec is None:
            return None
        return np.frombuffer(vec, dtype=np.float32), np.frombuffer(seen or b"", dtype=np.int32)
