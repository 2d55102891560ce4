"""ObjectStore contract, run against the local folder and S3 through moto's real HTTP server."""

from __future__ import annotations

import abc
import threading
import uuid

import pytest

from pipeline.storage import LocalStore, PreconditionFailed, StoreError


class ObjectStoreContract(abc.ABC):
    @pytest.fixture
    @abc.abstractmethod
    def store(self):
        """The store under test, supplied by each subclass."""

    def test_put_get_exists_list_delete(self, store):
        store.put("a/b/one.bin", b"1")
        store.put("a/two.bin", b"22")
        store.put("c/three.bin", b"333")
        assert store.get("a/b/one.bin") == b"1"
        assert store.exists("a/two.bin") and not store.exists("a/missing")
        assert store.list("a/") == ["a/b/one.bin", "a/two.bin"]
        store.delete("a/two.bin")
        assert not store.exists("a/two.bin")
        with pytest.raises(FileNotFoundError):
            store.get("a/two.bin")

    def test_overwrite_is_whole(self, store):
        store.put("k", b"x" * 1000)
        store.put("k", b"y")
        assert store.get("k") == b"y"

    def test_conditional_put(self, store):
        store.put_if("ptr", b"v1", etag=None)
        with pytest.raises(PreconditionFailed):
            store.put_if("ptr", b"again", etag=None)
        data, etag = store.get_with_etag("ptr")
        assert data == b"v1"
        store.put_if("ptr", b"v2", etag=etag)
        with pytest.raises(PreconditionFailed):
            store.put_if("ptr", b"v3", etag=etag)  # stale etag loses
        assert store.get("ptr") == b"v2"
        assert store.get_with_etag("nothing") is None

    def test_concurrent_conditional_writers_exactly_one_wins(self, store):
        store.put_if("race", b"base", etag=None)
        _, etag = store.get_with_etag("race")
        wins, losses = [], []
        barrier = threading.Barrier(8)

        def writer(n: int) -> None:
            barrier.wait()
            try:
                store.put_if("race", f"w{n}".encode(), etag=etag)
                wins.append(n)
            except PreconditionFailed:
                losses.append(n)

        threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(wins) == 1 and len(losses) == 7
        assert store.get("race") == f"w{wins[0]}".encode()

    def test_keys_cannot_escape_the_root(self, store):
        with pytest.raises(StoreError):
            store.put("../outside", b"x")


class TestLocalStore(ObjectStoreContract):
    @pytest.fixture
    def store(self, tmp_path):
        return LocalStore(tmp_path / "root")


@pytest.mark.integration
class TestS3Store(ObjectStoreContract):
    @pytest.fixture
    def store(self, s3_endpoint, monkeypatch):
        import boto3

        from pipeline.storage.s3 import S3Store

        for k, v in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": s3_endpoint,
        }.items():
            monkeypatch.setenv(k, v)
        bucket = f"b-{uuid.uuid4().hex[:10]}"
        boto3.client("s3").create_bucket(Bucket=bucket)
        return S3Store(f"s3://{bucket}/prefix")

    def test_multipart_upload_round_trips(self, store, monkeypatch):
        from pipeline.storage import s3

        monkeypatch.setattr(s3, "MULTIPART_THRESHOLD", 5 * 1024 * 1024)
        blob = bytes(range(256)) * (6 * 1024 * 1024 // 256 + 7)
        store.put("big.bin", blob)
        assert store.get("big.bin") == blob
