"""Per-tenant access: API keys (only sha256 hashes stored) and rate limits (RECSYS_API_KEYS_FILE).

```yaml
acme: [3f1c...sha256 hex...]          # short form: the tenant's key hashes
beta:
  keys: [9a0b...]
  rate_limit: 50/second;2000/minute   # `limits` notation; overrides RECSYS_RATE_LIMIT
```
Missing key: 401. A key that is not one of this tenant's (e.g. another tenant's): 403.
Over the limit: 429 with Retry-After.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.serving.breaker import Breaker, is_outage

log = logging.getLogger(__name__)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Access:
    key_hashes: dict[str, frozenset[str]] = field(default_factory=dict)
    rate_limits: dict[str, str] = field(default_factory=dict)


def load_access(path: Path | None) -> Access:
    if path is None:
        return Access()
    raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping tenant -> [sha256 hex, ...] or {{keys, rate_limit}}")
    hashes, limits = {}, {}
    for tenant, value in raw.items():
        if isinstance(value, dict):
            unknown = set(value) - {"keys", "rate_limit"}
            if unknown:
                raise ValueError(f"{path}: tenant {tenant!r}: unknown field(s) {sorted(unknown)}")
            if value.get("rate_limit") is not None:
                limits[str(tenant)] = str(value["rate_limit"])
            value = value.get("keys")
        hashes[str(tenant)] = frozenset(str(h).lower() for h in (value or []))
    return Access(hashes, limits)


def admin_allowed(token: str | None, authorization: str | None) -> bool:
    """Whether `Authorization: Bearer <token>` carries RECSYS_ADMIN_TOKEN (Prometheus sends it so)."""
    if not token or not authorization:
        return False
    scheme, _, given = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def key_allowed(hashes: dict[str, frozenset[str]], tenant: str, key: str) -> bool:
    digest = hash_key(key)
    return any(hmac.compare_digest(digest, h) for h in hashes.get(tenant, ()))


class RateLimiter:
    """Per-tenant request limits through the `limits` library's asyncio API (Redis-backed when
    configured, so all workers share one budget; in-process otherwise).

    Async (`limits.aio`, redis.asyncio underneath): the check runs in an async dependency, on
    the event loop, so a synchronous Redis call there would stall every request in flight.
    """

    def __init__(
        self, default: str, overrides: dict[str, str], storage_uri: str, key_prefix: str, breaker: Breaker | None = None
    ) -> None:
        import limits
        from limits.aio.strategies import SlidingWindowCounterRateLimiter
        from limits.storage import storage_from_string

        self._parse = limits.parse_many
        self.default = self._parse(default) if default else []
        self.overrides = {t: self._parse(v) if v else [] for t, v in overrides.items()}
        self.breaker = breaker
        options: dict[str, Any] = {}
        if storage_uri.startswith("redis"):
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff

            # redis.asyncio retries 3 times with backoff by default: a dead Redis would hold each request
            options = {
                "key_prefix": key_prefix,
                "implementation": "redispy",
                "socket_timeout": 0.05,
                "socket_connect_timeout": 0.05,
                "retry": Retry(NoBackoff(), 0),
            }
        self.limiter = SlidingWindowCounterRateLimiter(storage_from_string(f"async+{storage_uri}", **options))

    async def check(self, tenant: str) -> float | None:
        """None when allowed; else seconds until the tenant may retry. Fails open: if the
        limiter's store is unreachable (or Redis's breaker is open) the request is served."""
        items = self.overrides.get(tenant, self.default)
        if not items or (self.breaker is not None and self.breaker.is_open):
            return None
        try:
            for item in items:
                if not await self.limiter.hit(item, "tenant", tenant):
                    stats = await self.limiter.get_window_stats(item, "tenant", tenant)
                    return max(stats.reset_time - time.time(), 0.0)
        except Exception as exc:  # redis down or slow: availability over strict limits
            if self.breaker is not None and is_outage(exc):
                self.breaker.failure()
            log.warning("rate limiter unavailable for tenant %s (%s); request allowed", tenant, exc)
        return None
