"""The tenant's erasure list: users whose data was deleted on request (`python -m pipeline forget-user`).

`tenants/{t}/erased_users.parquet` holds one column, `user_sha256` (the sha256 of the user
id), never the id itself: recognising the user is all it is for. Every extract drops these
users from what it reads (the tenant's source still has their old events, and a later
bootstrap or plain-file source would read them again), so no later run, feature table or
release contains them. The list only grows; removing a user from it is a person's decision.
"""

from __future__ import annotations

import hashlib

import pandas as pd

from pipeline.storage import ObjectStore, codecs
from pipeline.storage.base import PreconditionFailed

_ATTEMPTS = 20


def key(tenant: str) -> str:
    return f"tenants/{tenant}/erased_users.parquet"


def user_hash(user_id: str) -> str:
    return hashlib.sha256(str(user_id).encode()).hexdigest()


def hashes(store: ObjectStore, tenant: str) -> frozenset[str]:
    """The erased users' hashes (empty when nobody was erased)."""
    got = store.get_with_etag(key(tenant))
    return frozenset() if got is None else frozenset(codecs.read_parquet(got[0])["user_sha256"].astype(str))


def add(store: ObjectStore, tenant: str, user_id: str) -> bool:
    """Add the user (a conditional put, retried: two requests at once both land). True if new."""
    h = user_hash(user_id)
    for _ in range(_ATTEMPTS):
        got = store.get_with_etag(key(tenant))
        old = set() if got is None else set(codecs.read_parquet(got[0])["user_sha256"].astype(str))
        if h in old:
            return False
        data = codecs.parquet_bytes(pd.DataFrame({"user_sha256": sorted(old | {h})}, dtype="string"))
        try:
            store.put_if(key(tenant), data, etag=None if got is None else got[1])
            return True
        except PreconditionFailed:
            continue
    raise RuntimeError(f"tenant {tenant}: could not update {key(tenant)} after {_ATTEMPTS} attempts (contention)")


def erased_mask(user_id: pd.Series, erased: frozenset[str]) -> pd.Series:
    """True for rows of an erased user. Hashes each distinct id once (sha256 has no vectorised
    form in numpy/pandas), and nothing at all while the list is empty."""
    if not erased or not len(user_id):
        return pd.Series(False, index=user_id.index)
    codes, uniq = pd.factorize(user_id.astype("string"), use_na_sentinel=True)
    hit = pd.Series([user_hash(u) in erased for u in uniq], dtype=bool).to_numpy()
    out = pd.Series(False, index=user_id.index)
    valid = codes >= 0
    out[valid] = hit[codes[valid]]
    return out
