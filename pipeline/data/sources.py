"""Tenant data sources: files (CSV, Parquet, JSON Lines; optionally .gz), local or on S3, and SQL.

A file source is one file, a folder / S3 prefix of them, or Hive-style daily partitions
(`.../dt=YYYY-MM-DD/...`): with partitions, callers list the files first and fetch only the
partitions they need (`SourceFile.date`, `SourceFile.read()`), so a nightly run does not
download the whole history. A SQL source is a SQLAlchemy URL plus a query whose `:start` and
`:end` bind parameters receive the window a run reads (UTC-aware datetimes).

Everything here raises `SourceError` naming the file or field; a `Reader` turns it into the
caller's error (a StageError for the tenant and run).
"""

from __future__ import annotations

import builtins
import gzip
import io
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.config.tenant import is_sql_url
from pipeline.storage import codecs

__all__ = ["EPOCH", "Reader", "SourceError", "SourceFile", "is_sql_url", "list_files", "read_sql", "read_table"]

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)  # the `:start` of a SQL read that wants everything

SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}
# with an explicit `format: jsonl`, plain .json files are read as JSON Lines too
_EXPLICIT_EXTRA = {"jsonl": {".json"}}
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class SourceError(ValueError):
    """A source could not be listed or read; the message names the file or field and why."""


def expand_env(value: str, field_name: str) -> str:
    """`${NAME}` -> the environment variable (so passwords stay out of tenant files)."""

    def sub(m: re.Match) -> str:
        if m.group(1) not in os.environ:
            raise SourceError(f"{field_name}: environment variable {m.group(1)} is not set")
        return os.environ[m.group(1)]

    return _ENV.sub(sub, value)


def _suffixes(name: str) -> tuple[str, bool]:
    """(format suffix, gzipped) of a file name: `a.jsonl.gz` -> ('.jsonl', True)."""
    path = Path(name)
    if path.suffix.lower() == ".gz":
        return Path(path.stem).suffix.lower(), True
    return path.suffix.lower(), False


def _wanted(fmt: str) -> set[str]:
    if fmt == "auto":
        return set(SUFFIXES)
    return {s for s, f in SUFFIXES.items() if f == fmt} | _EXPLICIT_EXTRA.get(fmt, set())


@dataclass(frozen=True)
class SourceFile:
    name: str  # path or s3:// URI, for messages
    rel: str  # path below the source root (partition folders included)
    date: date | None  # the Hive partition's date, None when the source is not partitioned
    fetch: Callable[[], bytes] = field(repr=False, compare=False)

    def read(self) -> bytes:
        data = self.fetch()
        return gzip.decompress(data) if _suffixes(self.name)[1] else data


def partition_date(rel: str, key: str) -> date | None:
    """The date of the first `{key}=YYYY-MM-DD` folder in a relative path, else None."""
    prefix = f"{key}="
    for part in rel.split("/")[:-1]:
        if part.startswith(prefix) and _DATE.match(part[len(prefix) :]):
            return date.fromisoformat(part[len(prefix) :])
    return None


def list_files(
    uri: str, fmt: str, data_root: Path, partition_key: str = "dt", field_name: str = "source.uri"
) -> tuple[list[SourceFile], bool]:
    """Every data file of a file source, sorted by relative path (partitions: by date).

    Returns (files, partitioned). Nothing is downloaded yet: `SourceFile.read()` does that.
    """
    wanted = _wanted(fmt)
    if uri.startswith("s3://"):
        from pipeline.storage.s3 import S3Store

        bucket, _, key = uri[len("s3://") :].rstrip("/").partition("/")
        parent, _, name = key.rpartition("/")
        one = S3Store(f"s3://{bucket}/{parent}".rstrip("/")) if key and not uri.endswith("/") else None
        store = S3Store(uri.rstrip("/"))
        if one is not None and one.exists(name):  # a single object
            files = [SourceFile(uri, name, None, partial(one.get, name))]
        else:
            keys = [k for k in store.list("") if _suffixes(k)[0] in wanted]
            if not keys:
                raise SourceError(f"{field_name} {uri}: no {sorted(wanted)} objects found")
            files = [SourceFile(store.uri(k), k, partition_date(k, partition_key), partial(store.get, k)) for k in keys]
    else:
        path = Path(uri)
        if not path.is_absolute():
            path = data_root / path
        if path.is_file():
            files = [SourceFile(str(path), path.name, None, path.read_bytes)]
        elif path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and not p.name.startswith(".") and _suffixes(p.name)[0] in wanted
            )
            if not found:
                raise SourceError(f"{field_name} {path}: folder has no {sorted(wanted)} files")
            files = []
            for p in found:
                rel = p.relative_to(path).as_posix()
                files.append(SourceFile(str(p), rel, partition_date(rel, partition_key), p.read_bytes))
        else:
            raise SourceError(f"{field_name} {path}: no such file or folder")
    dated = [f for f in files if f.date is not None]
    if dated and len(dated) != len(files):
        stray = next(f.name for f in files if f.date is None)
        raise SourceError(
            f"{field_name} {uri}: partitioned by {partition_key}=YYYY-MM-DD, but {stray} is in no such partition"
        )
    files.sort(key=lambda f: (f.date or date.min, f.rel))
    return files, bool(dated)


def read_table(name: str, data: bytes, fmt: str, delimiter: str, id_cols: list[str]) -> pd.DataFrame:
    """One file's bytes as a DataFrame; id columns of CSV files stay strings (leading zeros)."""
    if fmt == "auto":
        fmt = SUFFIXES.get(_suffixes(name)[0], "csv")
    try:
        if fmt == "csv":
            return pd.read_csv(
                io.BytesIO(data), sep=delimiter, dtype=dict.fromkeys(id_cols, "string"), encoding="utf-8"
            )
        if fmt == "jsonl":
            if not data.strip():
                return pd.DataFrame()
            # no dtype or date guessing: ids and timestamps are normalised by the caller
            return pd.read_json(
                io.BytesIO(data), lines=True, dtype=False, convert_dates=False, keep_default_dates=False
            )
        return codecs.read_parquet(data)
    except UnicodeDecodeError as exc:
        raise SourceError(f"file {name}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    except Exception as exc:  # parser errors vary by engine; say which file and why
        raise SourceError(f"file {name}: unreadable as {fmt}: {exc}") from None


def safe_url(url: str) -> str:
    """The URL with its password hidden, for logs and messages."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@", 1)[-1]


def read_sql(url: str, query: str, params: dict[str, Any], field_name: str = "source") -> pd.DataFrame:
    """Run `query` with `params` (datetimes UTC-aware) and return every row as a DataFrame.

    Rows are fetched in chunks with a server-side cursor where the driver supports one; the
    engine is disposed afterwards (no pool outlives the task).
    """
    import sqlalchemy as sa
    from sqlalchemy.pool import NullPool

    url = expand_env(url, f"{field_name}.uri")
    try:
        engine = sa.create_engine(url, poolclass=NullPool)
    except Exception as exc:
        raise SourceError(f"{field_name}.uri {safe_url(url)}: {exc}") from None
    try:
        with engine.connect() as conn:
            result = conn.execution_options(stream_results=True, yield_per=50_000).execute(sa.text(query), params)
            columns = list(result.keys())
            chunks = [pd.DataFrame.from_records(list(rows), columns=columns) for rows in result.partitions()]
    except sa.exc.SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise SourceError(f"{field_name}.query on {safe_url(url)}: {reason}") from None
    finally:
        engine.dispose()
    if not chunks:
        return pd.DataFrame({c: pd.Series(dtype="object") for c in columns})
    df = pd.concat(chunks, ignore_index=True) if len(chunks) > 1 else chunks[0]
    for col in df.columns:  # driver datetimes (aware or naive) -> pandas datetimes
        values = df[col].dropna()
        if df[col].dtype == object and len(values) and isinstance(values.iloc[0], datetime):
            df[col] = pd.to_datetime(df[col], utc=True)
    return df


@dataclass(frozen=True)
class Reader:
    """These functions with `SourceError` raised as `error(message)` instead: one place where a
    stage turns a bad source into its own error, naming the tenant and run."""

    data_root: Path
    error: Callable[[str], Exception]

    def list(self, uri: str, fmt: str, field_name: str, partition_key: str = "dt") -> tuple[list[SourceFile], bool]:
        try:
            return list_files(uri, fmt, self.data_root, partition_key, field_name)
        except SourceError as exc:
            raise self.error(str(exc)) from None

    # below `list`, annotations in this class must say builtins.list (`list` names the method)
    def files(self, uri: str, fmt: str, field_name: str) -> builtins.list[tuple[str, bytes]]:
        """(name, bytes) of every file of a source (file, folder, s3 object or prefix), sorted."""
        return [(f.name, f.read()) for f in self.list(uri, fmt, field_name)[0]]

    def table(self, name: str, data: bytes, fmt: str, delimiter: str, id_cols: builtins.list[str]) -> pd.DataFrame:
        try:
            return read_table(name, data, fmt, delimiter, id_cols)
        except SourceError as exc:
            raise self.error(str(exc)) from None

    def sql(self, url: str, query: str, params: dict[str, Any], field_name: str) -> pd.DataFrame:
        try:
            return read_sql(url, query, params, field_name)
        except SourceError as exc:
            raise self.error(str(exc)) from None
