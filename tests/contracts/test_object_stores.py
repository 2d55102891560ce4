"""The ObjectStore contract, run by the local folder and by S3 through moto's real HTTP server."""

from __future__ import annotations

import uuid

import pytest

from pipeline.storage import LocalStore
from tests.contracts.object_store import ObjectStoreContract


class TestLocalStore(ObjectStoreContract):
    @pytest.fixture
    def make(self, tmp_path):
        return lambda name: LocalStore(tmp_path / name)


@pytest.mark.integration
class TestS3Store(ObjectStoreContract):
    @pytest.fixture
    def make(self, s3_env, monkeypatch):
        """Stores under prefixes of one fresh bucket; the multipart threshold at S3's 5 MiB minimum
        part size, so the contract's large object goes up in parts."""
        import boto3

        from pipeline.storage import s3

        monkeypatch.setattr(s3, "MULTIPART_THRESHOLD", 5 * 1024 * 1024)
        bucket = f"b-{uuid.uuid4().hex[:12]}"
        boto3.client("s3").create_bucket(Bucket=bucket)
        return lambda name: s3.S3Store(f"s3://{bucket}/{name}")
