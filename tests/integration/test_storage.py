"""What the two object stores do beyond their shared contract (tests/contracts/object_store.py)."""

from __future__ import annotations

import os
import uuid

import pytest

from pipeline.storage import LocalStore, StoreError, open_store
from pipeline.storage.s3 import S3Store


def test_open_store_picks_the_implementation_by_scheme(tmp_path, s3_env):
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    assert open_store(f"file://{tmp_path}").root == str(tmp_path.resolve())
    assert isinstance(open_store("s3://bucket/prefix"), S3Store)
    with pytest.raises(StoreError, match="unsupported artifact root"):
        open_store("gs://bucket/prefix")
    with pytest.raises(StoreError, match="not an s3:// URI"):
        S3Store("s3:///no-bucket")


def test_local_temp_and_lock_files_are_never_listed(tmp_path):
    store = LocalStore(tmp_path)
    store.put_if("tenants/t/current.json", b"{}", etag=None)  # leaves .current.json.lock beside it
    store.put("tenants/t/data.bin", b"1")
    assert (tmp_path / "tenants/t/.current.json.lock").exists()
    assert store.list("") == ["tenants/t/current.json", "tenants/t/data.bin"]


def test_local_failed_write_keeps_the_old_object_and_no_temp_file(tmp_path, monkeypatch):
    store = LocalStore(tmp_path)
    store.put("k.bin", b"old")

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        store.put("k.bin", b"new")
    monkeypatch.undo()
    assert store.get("k.bin") == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.bin"]


def test_local_symlink_out_of_the_root_is_refused(tmp_path):
    (tmp_path / "outside").mkdir()
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(tmp_path / "outside")
    with pytest.raises(StoreError, match="escapes"):
        LocalStore(root).put("link/x", b"x")
    assert not (tmp_path / "outside" / "x").exists()


@pytest.mark.integration
def test_s3_large_objects_go_up_in_parts(s3_env, monkeypatch):
    import boto3

    from pipeline.storage import s3

    monkeypatch.setattr(s3, "MULTIPART_THRESHOLD", 5 * 1024 * 1024)
    bucket = f"b-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    store = S3Store(f"s3://{bucket}/prefix")
    blob = os.urandom(6 * 1024 * 1024 + 7)
    store.put("big.bin", blob)
    data, etag = store.get_with_etag("big.bin")
    assert data == blob and etag.strip('"').endswith("-2")  # S3's etag of a 2-part upload
    store.put("small.bin", b"x")
    assert "-" not in store.get_with_etag("small.bin")[1]


@pytest.mark.integration
def test_s3_store_at_the_bucket_root(s3_env):
    import boto3

    bucket = f"b-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    store = S3Store(f"s3://{bucket}")
    store.put("a/b", b"1")
    S3Store(f"s3://{bucket}/a").put("c", b"2")  # the same bucket through a prefixed store
    assert store.list("") == ["a/b", "a/c"] and store.uri("a/b") == f"s3://{bucket}/a/b"
