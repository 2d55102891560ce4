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


def key_allowed(hashes: dict[str, frozenset[str]], tenant: str, key: str) -> bool:
    digest = hash_key(key)
    return any(hmac.compare_digest(digest, h) for h in hashes.get(tenant, ()))


class RateLimiter:
    """Per-tenant request limits through the `limits` library (Redis-backed when configured,
    so all workers share one budget; in-process otherwise)."""

    def __init__(self, default: str, overrides: dict[str, str], storage_uri: str, key_prefix: str) -> None:
        import limits
        from limits.storage import storage_from_string
        from limits.strategies import SlidingWindowCounterRateLimiter

        self._parse = limits.parse_many
        self.default = self._parse(default) if default else []
        self.overrides = {t: self._parse(v) if v else [] for t, v in overrides.items()}
        # short timeouts: the check runs on the event loop, and a slow Redis must not stall it
        options: dict[str, Any] = (
            {"key_prefix": key_prefix, "socket_timeout": 0.05, "socket_connect_timeout": 0.2}
            if storage_uri.startswith("redis")
            else {}
        )
        self.limiter = SlidingWindowCounterRateLimiter(storage_from_string(storage_uri, **options))

    def check(self, tenant: str) -> float | None:
        """None when allowed; else seconds until the tenant may retry. Fails open: if the
        limiter's store is unreachable the request is served (and the error logged)."""
        try:
            for item in self.overrides.get(tenant, self.default):
                if not self.limiter.hit(item, "tenant", tenant):
                    stats = self.limiter.get_window_stats(item, "tenant", tenant)
                    return max(stats.reset_time - time.time(), 0.0)
        except Exception as exc:  # redis down or slow: availability over strict limits
            log.warning("rate limiter unavailable for tenant %s (%s); request allowed", tenant, exc)
        return None
