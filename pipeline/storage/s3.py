"""S3 artifact store through boto3 (AWS, MinIO or moto: the endpoint comes from AWS_ENDPOINT_URL).

Large objects go up as multipart uploads (boto3's transfer manager); pointers use S3's
conditional writes (If-None-Match / If-Match) so two publishers cannot both win.
"""

from __future__ import annotations

import io
from typing import Any
from urllib.parse import urlparse

from pipeline.storage.base import PreconditionFailed, StoreError

MULTIPART_THRESHOLD = 16 * 1024 * 1024


def serving_config(connect_s: float, read_s: float, attempts: int) -> Any:
    """botocore Config for serving: a pointer poll or a release load fails within seconds
    (boto3's defaults are 60 s timeouts with retries), so a dead S3 trips serving's breaker
    and a never-loaded tenant answers 503 quickly; stages keep the defaults."""
    from botocore.config import Config

    return Config(
        connect_timeout=connect_s,
        read_timeout=read_s,
        retries={"max_attempts": attempts, "mode": "standard"},
    )


class S3Store:
    def __init__(self, uri: str, client: Any = None, config: Any = None) -> None:
        """`client`: a boto3 S3 client (Any: boto3 ships no type stubs); None builds one from the environment,
        with `config` (a botocore Config, e.g. `serving_config`) if given."""
        parsed = urlparse(uri)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise StoreError(f"not an s3:// URI: {uri!r}")
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.root = uri.rstrip("/")
        if client is None:
            import boto3  # boto3 reads AWS_ENDPOINT_URL / AWS_* itself

            client = boto3.client("s3", config=config)
        self._s3 = client

    def _key(self, key: str) -> str:
        key = key.lstrip("/")
        if ".." in key.split("/"):
            raise StoreError(f"key {key!r} escapes the store root {self.root}")
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def put(self, key: str, data: bytes) -> None:
        from boto3.s3.transfer import TransferConfig

        cfg = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_THRESHOLD)
        self._s3.upload_fileobj(io.BytesIO(data), self.bucket, self._key(key), Config=cfg)

    def get(self, key: str) -> bytes:
        try:
            return self._s3.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except self._s3.exceptions.NoSuchKey:
            raise FileNotFoundError(f"no such artifact: {self.uri(key)}") from None

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self._s3.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def list(self, prefix: str) -> list[str]:
        full = self._key(prefix) if prefix else (self.prefix + "/" if self.prefix else "")
        strip = len(self.prefix) + 1 if self.prefix else 0
        keys: list[str] = []
        for page in self._s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
            keys.extend(obj["Key"][strip:] for obj in page.get("Contents", []))
        return sorted(keys)

    def delete(self, key: str) -> None:
        self._s3.delete_object(Bucket=self.bucket, Key=self._key(key))

    def get_with_etag(self, key: str) -> tuple[bytes, str] | None:
        try:
            obj = self._s3.get_object(Bucket=self.bucket, Key=self._key(key))
        except self._s3.exceptions.NoSuchKey:
            return None
        return obj["Body"].read(), obj["ETag"]

    def put_if(self, key: str, data: bytes, *, etag: str | None) -> None:
        from botocore.exceptions import ClientError

        cond = {"IfNoneMatch": "*"} if etag is None else {"IfMatch": etag}
        try:
            self._s3.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **cond)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            lost = ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")
            if code in lost or (etag is not None and code in ("NoSuchKey", "404")):  # If-Match on a deleted object
                raise PreconditionFailed(f"{self.uri(key)}: conditional write lost ({code})") from None
            raise
