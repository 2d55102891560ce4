"""Per-tenant API keys: only sha256 hashes are stored (RECSYS_API_KEYS_FILE, YAML).

```yaml
acme: [3f1c...sha256 hex...]
```
Missing key: 401. A key that is not one of this tenant's (e.g. another tenant's): 403.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import yaml


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def load_key_hashes(path: Path | None) -> dict[str, frozenset[str]]:
    if path is None:
        return {}
    raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping tenant -> [sha256 hex, ...]")
    return {str(t): frozenset(str(h).lower() for h in (hashes or [])) for t, hashes in raw.items()}


def key_allowed(hashes: dict[str, frozenset[str]], tenant: str, key: str) -> bool:
    digest = hash_key(key)
    return any(hmac.compare_digest(digest, h) for h in hashes.get(tenant, ()))
