"""Artifact store chosen by URI scheme: a local folder or s3://bucket/prefix."""

from __future__ import annotations

from pipeline.storage.base import ObjectStore, PreconditionFailed, StoreError, etag_of
from pipeline.storage.local import LocalStore


def open_store(uri: str) -> ObjectStore:
    if uri.startswith("s3://"):
        from pipeline.storage.s3 import S3Store

        return S3Store(uri)
    if "://" in uri and not uri.startswith("file://"):
        raise StoreError(f"unsupported artifact root {uri!r}: use a folder or s3://bucket/prefix")
    return LocalStore(uri.removeprefix("file://"))


__all__ = ["LocalStore", "ObjectStore", "PreconditionFailed", "StoreError", "etag_of", "open_store"]
