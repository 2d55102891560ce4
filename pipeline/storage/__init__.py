"""Artifact store chosen by URI scheme: a local folder or s3://bucket/prefix."""

from __future__ import annotations

from typing import Any

from pipeline.storage.base import ObjectStore, PreconditionFailed, StoreError, etag_of
from pipeline.storage.local import LocalStore


def open_store(uri: str, s3_config: Any = None) -> ObjectStore:
    """`s3_config`: a botocore Config for s3:// roots (serving passes short timeouts)."""
    if uri.startswith("s3://"):
        from pipeline.storage.s3 import S3Store

        return S3Store(uri, config=s3_config)
    if "://" in uri and not uri.startswith("file://"):
        raise StoreError(f"unsupported artifact root {uri!r}: use a folder or s3://bucket/prefix")
    return LocalStore(uri.removeprefix("file://"))


__all__ = ["LocalStore", "ObjectStore", "PreconditionFailed", "StoreError", "etag_of", "open_store"]
