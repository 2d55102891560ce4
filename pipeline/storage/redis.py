"""Redis: the client every part of the project opens, the key layout and the pointer's Lua.

Key layout (all values binary, never pickle):
  {prefix}:{tenant}:current                  -> release id (flipped last, atomically)
  {prefix}:{tenant}:{release}:u:{user_id}    -> float32 user vector (empty for item-item releases: the
                                                seen list scores the user; the key marks them known)
  {prefix}:{tenant}:{release}:seen:{user_id} -> int32 item indices of the release
  {prefix}:{tenant}:{release}:popular        -> int32 item indices, most popular first
  {prefix}:{tenant}:{release}:meta           -> hash: users, dim, scoring, complete=1 (written last)
  {prefix}:{tenant}:{release}:uf:{user_id}   -> float32 online user features (names in meta.user_features)
  {prefix}:{tenant}:{release}:fu:{user_id}   -> float32 vector folded in from API events (serving; empty
                                                for item-item releases, as `u:`)
  {prefix}:{tenant}:{release}:fseen:{user_id} -> int32 item indices after those events, newest first

The refresh stage writes the release's keys and flips `current`; serving reads them
(pipeline/serving/user_store.py); maintenance expires them. Neither side imports the other:
both come here.
"""

from __future__ import annotations

from typing import Any


def redis_client(url: str) -> Any:
    """A binary-safe client for RECSYS_REDIS_URL (responses stay bytes: vectors are raw float32)."""
    import redis

    return redis.Redis.from_url(url, decode_responses=False, socket_timeout=30, retry_on_timeout=True)


def serving_redis_client(url: str, timeout_ms: int) -> Any:
    """The request path's client: connect and read timeouts of `timeout_ms`, no retry.

    A request must not wait longer than its latency budget for Redis: on a timeout or a
    refused connection serving answers from the release files instead (degraded) and the
    breaker stops trying for a while. Stages keep `redis_client`'s long, retried calls.
    """
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    seconds = timeout_ms / 1000
    return redis.Redis.from_url(
        url,
        decode_responses=False,
        socket_timeout=seconds,
        socket_connect_timeout=seconds,
        retry_on_timeout=False,
        retry=Retry(NoBackoff(), 0),
    )


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
