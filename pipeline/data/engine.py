"""The out-of-core engine (DuckDB) as stages use it: a disk-backed session and Parquet in and out.

A session is a DuckDB database file in a private temporary folder, with the tenant's memory
limit (`data.memory_limit_gb`) and spilling to that folder: tables, sorts, joins and window
functions past the limit go to disk instead of failing. DuckDB reads Parquet with its built-in
reader (no extension is downloaded at run time; httpfs is not used: an S3 artifact is copied
to the session folder first, as one streamed file). Artifacts move through the object store as
bytes, so a table is held once in memory while it is copied in or out (the compressed file,
a fraction of the rows' in-memory size).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.context import RunContext
    from pipeline.storage.paths import Artifact


class Session:
    """One DuckDB connection and its folder; `path(name)` names a file inside it."""

    def __init__(self, con: Any, folder: Path) -> None:
        self.con, self.folder = con, folder

    def path(self, name: str) -> str:
        return (self.folder / name).as_posix()

    def sql(self, query: str, params: list[Any] | None = None) -> Any:
        """Run a statement (DDL runs at once) or a query (a relation: fetchone/fetchall it)."""
        return self.con.sql(query, params=params or None)

    def one(self, query: str, params: list[Any] | None = None) -> tuple:
        """The first row of a query's result."""
        return self.con.sql(query, params=params or None).fetchall()[0]

    def fetch_df(self, query: str, params: list[Any] | None = None):
        """A (small) query result as pandas."""
        return self.con.sql(query, params=params or None).to_arrow_table().to_pandas()

    def stage_in(self, ctx: RunContext, artifact: Artifact) -> str:
        """The run artifact as a local Parquet file DuckDB can stream (`read_parquet(path)`)."""
        target = self.path(f"{artifact.stage}_{artifact.name}".replace("/", "_"))
        data = ctx.read(artifact)
        Path(target).write_bytes(data)
        del data
        return _sql_str(target)

    def copy_out(self, ctx: RunContext, artifact: Artifact, query: str) -> str:
        """COPY the query's rows to Parquet (zstd, streamed by DuckDB) and write it as `artifact`."""
        target = self.path(f"out_{artifact.stage}_{artifact.name}".replace("/", "_"))
        self.con.sql(f"COPY ({query}) TO {_sql_str(target)} (FORMAT parquet, COMPRESSION zstd)")
        key = ctx.write(artifact, Path(target).read_bytes())
        os.unlink(target)
        return key


def _sql_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


@contextmanager
def session(ctx: RunContext) -> Iterator[Session]:
    """A DuckDB session with the tenant's limits; its folder (database, spills) is removed after."""
    import duckdb

    cfg = ctx.config.data
    folder = Path(tempfile.mkdtemp(prefix=f"recsys-duckdb-{ctx.tenant}-"))
    con = duckdb.connect((folder / "work.duckdb").as_posix())
    try:
        con.execute(f"SET memory_limit = '{cfg.memory_limit_gb:g}GB'")
        con.execute(f"SET temp_directory = {_sql_str((folder / 'spill').as_posix())}")
        con.execute("SET TimeZone = 'UTC'")  # TIMESTAMPTZ values come back (and truncate) in UTC
        con.execute("SET preserve_insertion_order = false")  # every output here is ordered explicitly
        if cfg.threads:
            con.execute(f"SET threads = {int(cfg.threads)}")
        yield Session(con, folder)
    finally:
        con.close()
        shutil.rmtree(folder, ignore_errors=True)
