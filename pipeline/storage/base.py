"""The artifact store interface: a flat key space of immutable-ish blobs.

Kept deliberately small (put/get/exists/list/delete + a conditional put for pointers) so a
local folder and S3 implement it the same way and share one contract test
(tests/contracts/object_store.py). What both promise:

- keys are '/'-separated relative paths; a '..' segment is refused (StoreError). Segments
  starting with '.' are reserved for the local store's temp and lock files.
- `list(prefix)` is a string prefix, as in S3: every key starting with `prefix`, sorted.
  `list("a/b")` also returns "a/bc"; pass "a/b/" for the folder only.
- `put` replaces an object whole; readers see the old bytes or the new, never a mix.
- `get` of a missing key raises FileNotFoundError; `delete` of one is a no-op.
- `uri(key)` is `f"{root}/{key}"`.
"""

from __future__ import annotations

import hashlib
from typing import Protocol, runtime_checkable


class StoreError(RuntimeError):
    """A storage operation failed; the message names the URI."""


class PreconditionFailed(StoreError):
    """A conditional put lost: the object changed (or exists) since it was read."""


def etag_of(data: bytes) -> str:
    """Content hash used as the local store's etag (S3 returns its own)."""
    return hashlib.sha256(data).hexdigest()


@runtime_checkable
class ObjectStore(Protocol):
    root: str

    def uri(self, key: str) -> str: ...

    def put(self, key: str, data: bytes) -> None: ...

    def get(self, key: str) -> bytes: ...

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str) -> list[str]: ...

    def delete(self, key: str) -> None: ...

    def get_with_etag(self, key: str) -> tuple[bytes, str] | None:
        """The object and its etag, or None when it does not exist."""

    def put_if(self, key: str, data: bytes, *, etag: str | None) -> None:
        """Write only if the object still has `etag` (None: only if it does not exist).

        Raises PreconditionFailed otherwise: this is how pointers flip without lost updates.
        """
