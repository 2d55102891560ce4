"""How a tenant's data stages compute: in memory (pandas) or out of core (DuckDB)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class DataEngineConfig(BaseModel):
    """`engine: duckdb` runs extract, features (and the exact checks of validate) out of core:
    DuckDB streams the source and the run's Parquet and spills sorts, joins and window functions to disk past
    `memory_limit_gb`, so a 100M-event tenant fits a box whose RAM holds a fraction of it.
    `pandas` (the default) holds every table in memory: fastest for small tenants."""

    model_config = ConfigDict(extra="forbid")

    engine: Literal["pandas", "duckdb"] = "pandas"
    memory_limit_gb: float = Field(default=6.0, gt=0, description="DuckDB's memory limit; past it, it spills.")
    threads: int | None = Field(default=None, ge=1, description="DuckDB threads (default: every core).")
