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
from dataclasses import dataclass, field
from pathlib import Path

import yaml


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
