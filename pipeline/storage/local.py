"""Local-folder artifact store: atomic writes (temp file + rename), fcntl-locked CAS."""

from __future__ import annotations

import fcntl
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from pipeline.storage.base import PreconditionFailed, StoreError, etag_of


class LocalStore:
    def __init__(self, root: str | Path) -> None:
        self._root = Path(root).expanduser().resolve()
        self.root = str(self._root)

    def _path(self, key: str) -> Path:
        key = key.lstrip("/")
        path = (self._root / key).resolve()
        if path != self._root and self._root not in path.parents:
            raise StoreError(f"key {key!r} escapes the store root {self.root}")
        return path

    def uri(self, key: str) -> str:
        return str(self._path(key))

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)  # readers see the old file or the new one, never half of it
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"no such artifact: {self.uri(key)}") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[str]:
        """Keys starting with `prefix` as a string (S3's semantics): walks only the deepest folder
        the prefix names whole, so "a/b" also finds "a/bc" and "a/b/" does not."""
        prefix = prefix.lstrip("/")
        folder, _, _ = prefix.rpartition("/")
        start = self._path(folder) if folder else self._root
        if not start.is_dir():
            return []
        out = []
        for p in start.rglob("*"):
            if p.is_file() and not p.name.startswith("."):
                key = p.relative_to(self._root).as_posix()
                if key.startswith(prefix):
                    out.append(key)
        return sorted(out)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def get_with_etag(self, key: str) -> tuple[bytes, str] | None:
        try:
            data = self._path(key).read_bytes()
        except FileNotFoundError:
            return None
        return data, etag_of(data)

    @contextmanager
    def _lock(self, key: str) -> Iterator[None]:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.parent / f".{path.name}.lock", "a+b") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def put_if(self, key: str, data: bytes, *, etag: str | None) -> None:
        with self._lock(key):
            current = self.get_with_etag(key)
            if etag is None and current is not None:
                raise PreconditionFailed(f"{self.uri(key)} already exists")
            if etag is not None and (current is None or current[1] != etag):
                raise PreconditionFailed(f"{self.uri(key)} changed since it was read")
            self.put(key, data)
