"""RunContext: what every stage gets. Names the tenant, the run (its data interval) and the stores.

The run id is derived from the data interval's end, never from the wall clock, so a rerun
of the same interval (Airflow retry, backfill, CLI) writes exactly the same keys.

A stage reaches the run's files only through `Artifact`s (pipeline/storage/paths.py). When
`pipeline/stages.py` runs a stage it scopes the context to the stage's declared `IO`, and
reading or writing anything undeclared fails at once: a change to one stage's outputs
breaks the stage that depends on them in its own tests, not a run far away.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import pandas as pd

from pipeline.config import Settings, TenantConfig, get_settings
from pipeline.storage import ObjectStore, codecs, open_store, paths
from pipeline.storage import lease as leases
from pipeline.storage.paths import Artifact


class StageLogger(logging.LoggerAdapter[logging.Logger]):
    """Every line carries tenant, run id and stage: as record attributes (for JSON/structured
    handlers) and as a key=value prefix (Airflow's task-log renderer shows only the message)."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        kwargs["extra"] = {**(self.extra or {}), **(kwargs.get("extra") or {})}
        e = self.extra or {}
        return f"tenant={e['tenant']} run_id={e['run_id']} stage={e['stage']} | {msg}", kwargs


class StageError(RuntimeError):
    """A stage failed on bad input; the message names the tenant, the file/field and the reason."""


class UndeclaredArtifact(RuntimeError):
    """A stage touched a run file its `IO` does not name: a wiring bug, never bad input."""


@dataclass(frozen=True)
class StageIO:
    """What a stage reads from and writes to its run (its result.json is always allowed)."""

    reads: tuple[Artifact, ...] = ()
    writes: tuple[Artifact, ...] = ()


def as_utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


@dataclass(frozen=True)
class RunContext:
    config: TenantConfig
    interval_end: datetime
    interval_start: datetime | None = None
    settings: Settings = field(default_factory=get_settings)
    store: ObjectStore = None  # type: ignore[assignment]  # filled in __post_init__
    stage: str | None = None  # set by `scoped`: the stage running, whose IO is enforced
    io: StageIO | None = None
    # who runs this interval (an Airflow dag run, a CLI invocation; default: this process) and
    # whether it may take the interval's lease from a live holder (pipeline/storage/lease.py)
    holder: leases.Holder | None = None
    takeover: bool = False

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
        return paths.run_id_of(self.interval_end)

    @property
    def run_holder(self) -> leases.Holder:
        return self.holder or leases.Holder.this_process()

    def take_lease(self, stage: str) -> tuple[RunContext, leases.Lease]:
        """Take the interval's lease for `stage`; the context returned writes only while it is held.

        Raises LeaseHeld when another copy of the run holds it; every write of the returned
        context checks the lease first (LeaseLost once another copy took it over)."""
        store = self.store.inner if isinstance(self.store, leases.FencedStore) else self.store
        lease = leases.acquire(
            store,
            self.tenant,
            self.run_id,
            self.run_holder,
            stage,
            ttl=self.settings.lease_ttl_seconds,
            takeover=self.takeover,
        )
        return replace(self, store=leases.FencedStore(store, lease)), lease

    def release_lease(self) -> bool:
        """End this run's hold on the interval (a failed run), if it still holds it."""
        store = self.store.inner if isinstance(self.store, leases.FencedStore) else self.store
        return leases.release_if_held(store, self.tenant, self.run_id, self.run_holder)

    def scoped(self, stage: str, io: StageIO, config: TenantConfig | None = None) -> RunContext:
        """This context for running `stage`: only its declared artifacts are reachable."""
        return replace(self, stage=stage, io=io, config=config or self.config)

    # ------------------------------------------------------------------ run artifacts
    def _check(self, artifact: Artifact, writing: bool) -> None:
        if self.io is None or artifact == paths.result(self.stage or ""):
            return
        allowed = self.io.writes if writing else (*self.io.reads, *self.io.writes)
        if artifact not in allowed:
            verb = "writes" if writing else "reads"
            raise UndeclaredArtifact(
                f"[tenant {self.tenant}, run {self.run_id}] stage {self.stage} {verb} {artifact}, "
                f"which its IO does not declare"
            )

    def key(self, artifact: Artifact, sub: str = "") -> str:
        return artifact.key(self.tenant, self.run_id, sub)

    def uri(self, artifact: Artifact, sub: str = "") -> str:
        return self.store.uri(self.key(artifact, sub))

    def exists(self, artifact: Artifact) -> bool:
        self._check(artifact, writing=False)
        return self.store.exists(self.key(artifact))

    def read(self, artifact: Artifact) -> bytes:
        self._check(artifact, writing=False)
        return self.store.get(self.key(artifact))

    def read_json(self, artifact: Artifact) -> dict[str, Any]:
        return codecs.read_json(self.read(artifact))

    def read_parquet(self, artifact: Artifact) -> pd.DataFrame:
        return codecs.read_parquet(self.read(artifact))

    def write(self, artifact: Artifact, data: bytes, sub: str = "") -> str:
        """Write an artifact (or a file under a folder artifact); returns its key."""
        self._check(artifact, writing=True)
        key = self.key(artifact, sub)
        self.store.put(key, data)
        return key

    def delete(self, artifact: Artifact) -> None:
        self._check(artifact, writing=True)
        if self.store.exists(self.key(artifact)):
            self.store.delete(self.key(artifact))

    # ------------------------------------------------------------------ stage plumbing
    def logger(self, stage: str) -> logging.LoggerAdapter[logging.Logger]:
        return StageLogger(
            logging.getLogger(f"pipeline.{stage}"),
            {"tenant": self.tenant, "run_id": self.run_id, "stage": stage},
        )

    def error(self, stage: str, message: str) -> StageError:
        return StageError(f"[tenant {self.tenant}, run {self.run_id}, stage {stage}] {message}")

    def write_result(self, stage: str, result: dict[str, Any]) -> dict[str, Any]:
        """Record a stage's small result beside its outputs (read by `pipeline summary`)."""
        self.store.put(paths.result(stage).key(self.tenant, self.run_id), codecs.json_bytes(result))
        return result

    def read_result(self, stage: str) -> dict[str, Any] | None:
        """Any stage's result, for reports (`pipeline summary`, the dashboard); stages read
        only the artifacts they declare."""
        key = paths.result(stage).key(self.tenant, self.run_id)
        return codecs.read_json(self.store.get(key)) if self.store.exists(key) else None
