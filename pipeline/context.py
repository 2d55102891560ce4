"""RunContext: what every stage gets. Names the tenant, the run (its data interval) and the stores.

The run id is derived from the data interval's end, never from the wall clock, so a rerun
of the same interval (Airflow retry, backfill, CLI) writes exactly the same keys.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pipeline.config import Settings, TenantConfig, get_settings
from pipeline.storage import ObjectStore, codecs, open_store, paths


class StageLogger(logging.LoggerAdapter):
    """Every line carries tenant, run id and stage: as record attributes (for JSON/structured
    handlers) and as a key=value prefix (Airflow's task-log renderer shows only the message)."""

    def process(self, msg, kwargs):
        kwargs["extra"] = {**self.extra, **(kwargs.get("extra") or {})}
        e = self.extra
        return f"tenant={e['tenant']} run_id={e['run_id']} stage={e['stage']} | {msg}", kwargs


class StageError(RuntimeError):
    """A stage failed on bad input; the message names the tenant, the file/field and the reason."""


def as_utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


@dataclass(frozen=True)
class RunContext:
    config: TenantConfig
    interval_end: datetime
    interval_start: datetime | None = None
    settings: Settings = field(default_factory=get_settings)
    store: ObjectStore = None  # type: ignore[assignment]  # filled in __post_init__

    def __post_init__(self) -> None:
        object.__setattr__(self, "interval_end", as_utc(self.interval_end))
        if self.interval_start is not None:
            object.__setattr__(self, "interval_start", as_utc(self.interval_start))
        if self.store is None:
            object.__setattr__(self, "store", open_store(self.settings.artifact_root))

    @property
    def tenant(self) -> str:
        return self.config.tenant

    @property
    def run_id(self) -> str:
        return self.interval_end.strftime("%Y%m%dT%H%M%SZ")

    def key(self, stage: str, name: str) -> str:
        return paths.stage_key(self.tenant, self.run_id, stage, name)

    def logger(self, stage: str) -> logging.LoggerAdapter:
        return StageLogger(
            logging.getLogger(f"pipeline.{stage}"),
            {"tenant": self.tenant, "run_id": self.run_id, "stage": stage},
        )

    def error(self, stage: str, message: str) -> StageError:
        return StageError(f"[tenant {self.tenant}, run {self.run_id}, stage {stage}] {message}")

    def write_result(self, stage: str, result: dict[str, Any]) -> dict[str, Any]:
        """Record a stage's small result beside its outputs (read by `pipeline summary`)."""
        self.store.put(self.key(stage, "result.json"), codecs.json_bytes(result))
        return result

    def read_result(self, stage: str) -> dict[str, Any] | None:
        key = self.key(stage, "result.json")
        return codecs.read_json(self.store.get(key)) if self.store.exists(key) else None
