"""Redis: the client every part of the project opens, the key layout and the pointer's Lua.

Key layout (all values binary, never pickle):
  {prefix}:{tenant}:current                  -> release id (flipped last, atomically)
  {prefix}:{tenant}:current_order            -> the store pointer generation `current` was set from
                                                (pipeline/release/pointer.py): Redis never moves to a lower one
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
    from redis.retry import Retry

    return redis.Redis.from_url(url, **_fail_fast(timeout_ms, Retry))


def serving_async_redis_client(url: str, timeout_ms: int) -> Any:
    """`serving_redis_client`'s twin on redis.asyncio (same timeouts, no retry): the async
    routes await the user read on the event loop instead of paying a threadpool hop."""
    import redis.asyncio
    from redis.asyncio.retry import Retry

    return redis.asyncio.Redis.from_url(url, **_fail_fast(timeout_ms, Retry))


async def aclose_bounded(client: Any, seconds: float = 2.0) -> bool:
    """Close a redis.asyncio client at shutdown, giving up after `seconds` (a connection stuck
    on a dead or paused server must not hang the process's exit); True if it closed."""
    import asyncio

    task = asyncio.ensure_future(client.aclose())
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if not done:
        task.cancel()
        return False
    return task.exception() is None


def _fail_fast(timeout_ms: int, retry: Any) -> dict[str, Any]:
    """Binary-safe, `timeout_ms` to connect and to read, never retried (sync or async Retry)."""
    from redis.backoff import NoBackoff

    seconds = timeout_ms / 1000
    return {
        "decode_responses": False,
        "socket_timeout": seconds,
        "socket_connect_timeout": seconds,
        "retry_on_timeout": False,
        "retry": retry(NoBackoff(), 0),
    }


def key(prefix: str, tenant: str, *parts: str) -> str:
    return ":".join((prefix, tenant, *parts))


# The tenant pointer's ordered flip (Redis 7 has no SET IFEQ/IFGT, so a tiny Lua script, atomic).
# KEYS: current, current_order. ARGV: release id, its order (the store pointer's generation) or
# '' for an unordered flip (tools, tests: compare-and-set against ARGV[3] only, order cleared),
# ARGV[3]: for unordered flips, the release id the caller read.
# Returns {code, the release id before, the order before (-1: none)}; code 1 flipped, 0 already
# current (its order raised if ours is higher), -1 refused: Redis holds an equal or higher order
# (a newer release, or a rollback), or for an unordered flip the pointer changed since read.
FLIP_SCRIPT = """
local cur = redis.call('GET', KEYS[1])
if cur == false then cur = '' end
local have = tonumber(redis.call('GET', KEYS[2]) or '-1') or -1
if ARGV[2] == '' then
  if cur ~= ARGV[3] then return {-1, cur, have} end
  redis.call('SET', KEYS[1], ARGV[1])
  redis.call('DEL', KEYS[2])
  return {1, cur, have}
end
local want = tonumber(ARGV[2])
if cur == ARGV[1] then
  if want > have then redis.call('SET', KEYS[2], ARGV[2]) end
  return {0, cur, have}
end
if want <= have then return {-1, cur, have} end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[2])
return {1, cur, have}
"""

# EXPIRE a batch of one release's keys unless that release is live (KEYS[1] = current): the
# expiry of a replaced release must not hit it after a rollback has made it live again.
# ARGV: release id, seconds. KEYS[2..]: the keys. Returns how many got a TTL.
EXPIRE_UNLESS_LIVE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return 0 end
local n = 0
for i = 2, #KEYS do n = n + redis.call('EXPIRE', KEYS[i], ARGV[2]) end
return n
"""
