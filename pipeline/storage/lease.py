"""Run leases: one writer per (tenant, data interval), fenced by a generation number.

Airflow runs a task at least once, Celery can deliver one twice, a backfill and the nightly
run can cover the same interval, and a person can start the CLI while the DAG runs. All of
them write the same keys (`runs/<interval end>/`, the history days, the release), so two
copies without a lease would mix outputs (one run's refit with another's index).

`tenants/{t}/leases/{run}.json` names the holder (an Airflow dag run, a CLI invocation, or
this process), a generation, the stage and Airflow try it is in, and a heartbeat. Each stage
takes the lease as it starts (`acquire`): the same holder continues (the next task of the
same dag run, a retry with a higher try number) and bumps the generation; anyone else fails
fast with `LeaseHeld` unless the lease was released (the run finished), has expired (no
heartbeat for its TTL, or its process is gone from this host) or they take it over. Every
write of the stage then goes through `FencedStore`, which first checks that the lease still
carries the generation the stage took: a zombie (an older try, a copy that was taken over, a
run that already finished) fails with `LeaseLost` at its next write instead of overwriting
the new holder's files.

The lease document itself moves only by conditional puts (local: a locked compare-and-swap;
S3: If-None-Match / If-Match on the ETag), so two copies racing for it cannot both win.
Limit: the check precedes each put, so a writer stalled between its check and its put can
still land that one write; the pointer flip, itself a conditional put, is the last line.
Heartbeats use the wall clock, which no stage output depends on.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from pipeline.storage import codecs, paths
from pipeline.storage.base import ObjectStore, PreconditionFailed

log = logging.getLogger(__name__)

Clock = Callable[[], float]


class LeaseHeld(RuntimeError):
    """Another copy of this run holds its lease: this one must not start (the message says how to take over)."""


class LeaseLost(RuntimeError):
    """This copy's lease was taken over or released: it must not write any more (it is a zombie)."""


@dataclass(frozen=True)
class Holder:
    """Who runs an interval. Copies with the same `id` are one run (a retry continues it)."""

    id: str
    attempt: int | None = None  # Airflow's try number: a lower or equal try of a stage is a stale duplicate
    process_bound: bool = True  # the run lives in one process: once that process is gone, so is the run
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)

    @classmethod
    def this_process(cls) -> Holder:
        """The default: every stage run in this process is one run (tests, notebooks)."""
        return cls(f"process:{socket.gethostname()}:{os.getpid()}")

    @classmethod
    def cli(cls) -> Holder:
        """One `python -m pipeline run` invocation."""
        return cls(f"cli:{uuid.uuid4().hex[:12]}")

    @classmethod
    def airflow(cls, dag_id: str, dag_run_id: str, try_number: int) -> Holder:
        """One dag run: its tasks run in different processes (and workers), so not process bound."""
        return cls(f"airflow:{dag_id}/{dag_run_id}", attempt=int(try_number), process_bound=False)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def expired(doc: dict[str, Any], now: float) -> str | None:
    """Why a held lease no longer protects its run (None: it does)."""
    age = now - float(doc["heartbeat"])
    if age > float(doc["ttl_seconds"]):
        return f"no heartbeat for {age:.0f}s (ttl {doc['ttl_seconds']}s)"
    if doc.get("process_bound") and doc.get("host") == socket.gethostname() and not _alive(int(doc["pid"])):
        return f"its process {doc['pid']} on {doc['host']} is gone"
    return None


def live(doc: dict[str, Any], now: float, horizon: float | None = None) -> bool:
    """Whether the run holding `doc` may still be running (retention keeps what it needs).

    `horizon` stretches the TTL: an Airflow run between two tasks sends no heartbeat while its
    next task waits in the queue, and a lease expiring is a reason to allow a takeover, not to
    delete the run's files."""
    if doc.get("released"):
        return False
    if horizon is not None:
        return now - float(doc["heartbeat"]) <= max(horizon, float(doc["ttl_seconds"]))
    return expired(doc, now) is None


def read(store: ObjectStore, tenant: str, run_id: str) -> tuple[dict[str, Any], str] | None:
    got = store.get_with_etag(paths.lease_key(tenant, run_id))
    return None if got is None else (json.loads(got[0]), got[1])


def _describe(doc: dict[str, Any], now: float) -> str:
    attempt = f", try {doc['attempts'][doc['stage']]}" if doc.get("stage") in doc.get("attempts", {}) else ""
    age = now - float(doc["heartbeat"])
    return (
        f"{doc['holder']} (stage {doc['stage']}{attempt}, host {doc['host']} pid {doc['pid']}, "
        f"generation {doc['generation']}, last heartbeat {age:.0f}s ago, "
        f"expires in {max(0.0, float(doc['ttl_seconds']) - age):.0f}s)"
    )


def acquire(
    store: ObjectStore,
    tenant: str,
    run_id: str,
    holder: Holder,
    stage: str,
    *,
    ttl: float,
    takeover: bool = False,
    clock: Clock = time.time,
) -> Lease:
    """Take (or continue) the run's lease for `stage`; raises LeaseHeld when another copy holds it."""
    key = paths.lease_key(tenant, run_id)
    where = f"[tenant {tenant}, interval {run_id}, stage {stage}]"
    for _ in range(8):  # a conditional put lost to a racing copy: re-read and decide again
        now = clock()
        current = read(store, tenant, run_id)
        doc, etag = current if current is not None else (None, None)
        attempts: dict[str, int] = {}
        if doc is not None and not doc.get("released"):
            if doc["holder"] == holder.id:
                attempts = {k: int(v) for k, v in doc.get("attempts", {}).items()}
                seen = attempts.get(stage)
                if holder.attempt is not None and seen is not None and holder.attempt <= seen and not takeover:
                    raise LeaseHeld(
                        f"{where} try {holder.attempt} of {holder.id} is a stale duplicate: try {seen} of this "
                        f"stage already took the lease (now {_describe(doc, now)}); refusing to run it again"
                    )
            elif takeover or (why := expired(doc, now)):
                log.warning(
                    "%s %s takes over the lease of %s: %s",
                    where,
                    holder.id,
                    _describe(doc, now),
                    "asked to (--takeover)" if takeover else why,
                )
            else:
                end = paths.interval_end_of(run_id).isoformat()
                raise LeaseHeld(
                    f"{where} this interval is being run by {_describe(doc, now)}; refusing to start a second "
                    f"copy ({holder.id}). If that run is dead, wait for its lease to expire or take it over: "
                    f"python -m pipeline run {tenant} --interval-end {end} --takeover (its later writes then fail)"
                )
        if holder.attempt is not None:
            attempts[stage] = holder.attempt
        generation = int(doc["generation"]) + 1 if doc is not None else 1
        new = {
            "tenant": tenant,
            "run_id": run_id,
            "holder": holder.id,
            "generation": generation,
            "stage": stage,
            "attempts": attempts,
            "host": holder.host,
            "pid": holder.pid,
            "process_bound": holder.process_bound,
            "heartbeat": now,
            "ttl_seconds": ttl,
            "released": False,
        }
        try:
            store.put_if(key, codecs.json_bytes(new), etag=etag)
        except PreconditionFailed:
            continue
        return Lease(store, tenant, run_id, holder.id, generation, ttl, clock)
    raise LeaseHeld(f"{where} lost the race for the lease to other copies of this run 8 times; refusing to start")


class Lease:
    """A held lease: `check` before each write (FencedStore does), `heartbeat` while a stage runs."""

    def __init__(
        self, store: ObjectStore, tenant: str, run_id: str, holder: str, generation: int, ttl: float, clock: Clock
    ) -> None:
        self.store, self.tenant, self.run_id = store, tenant, run_id
        self.holder, self.generation, self.ttl, self.clock = holder, generation, ttl, clock
        self.key = paths.lease_key(tenant, run_id)
        self._lock = threading.Lock()
        self._lost: LeaseLost | None = None

    def _mine(self) -> tuple[dict[str, Any], str]:
        """The lease document if this holder still owns it, else LeaseLost."""
        if self._lost is not None:
            raise self._lost
        current = read(self.store, self.tenant, self.run_id)
        doc = current[0] if current else None
        if doc is None or int(doc["generation"]) != self.generation or doc.get("released"):
            now = self.clock()
            state = (
                "was deleted"
                if doc is None
                else ("was released: the run finished" if doc.get("released") else f"is {_describe(doc, now)}")
            )
            self._lost = LeaseLost(
                f"[tenant {self.tenant}, interval {self.run_id}] {self.holder} (generation {self.generation}) lost "
                f"this run's lease, which {state}; refusing to write (this copy is stale)"
            )
            raise self._lost
        assert current is not None
        return current

    def _put(self, doc: dict[str, Any], etag: str) -> None:
        try:
            self.store.put_if(self.key, codecs.json_bytes(doc), etag=etag)
        except PreconditionFailed:
            self._mine()  # someone moved it: LeaseLost unless it is still ours (then the next beat renews)

    def check(self) -> None:
        """Raise LeaseLost unless this holder still owns the lease; renew the heartbeat when due."""
        with self._lock:
            doc, etag = self._mine()
            if self.clock() - float(doc["heartbeat"]) > self.ttl / 4:
                self._put({**doc, "heartbeat": self.clock()}, etag)

    def renew(self) -> None:
        with self._lock:
            doc, etag = self._mine()
            self._put({**doc, "heartbeat": self.clock()}, etag)

    def release(self) -> None:
        """The run is over (finished, rejected, failed on bad input): anyone may run the interval again."""
        with self._lock:
            try:
                doc, etag = self._mine()
            except LeaseLost:
                return
            try:
                self.store.put_if(self.key, codecs.json_bytes({**doc, "released": True}), etag=etag)
            except PreconditionFailed:
                return
            self._lost = LeaseLost(f"[tenant {self.tenant}, interval {self.run_id}] lease released; no more writes")

    @contextmanager
    def heartbeat(self) -> Iterator[Lease]:
        """Renew the lease every ttl/4 while a stage runs, so a long fit without writes keeps it."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.ttl / 4):
                try:
                    self.renew()
                except LeaseLost:
                    return  # the stage's next write raises it
                except Exception as exc:  # noqa: BLE001 - a store hiccup: the next beat retries
                    log.warning("lease heartbeat of %s/%s failed: %s", self.tenant, self.run_id, exc)

        thread = threading.Thread(target=beat, name=f"lease-{self.tenant}-{self.run_id}", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join(timeout=5)


def release_if_held(store: ObjectStore, tenant: str, run_id: str, holder: Holder) -> bool:
    """Release the run's lease if `holder` holds it (a failed run ends; someone else's lease stays)."""
    current = read(store, tenant, run_id)
    if current is None or current[0]["holder"] != holder.id or current[0].get("released"):
        return False
    try:
        store.put_if(
            paths.lease_key(tenant, run_id), codecs.json_bytes({**current[0], "released": True}), etag=current[1]
        )
    except PreconditionFailed:
        return False
    return True


class FencedStore:
    """An ObjectStore whose every write first checks the run's lease (reads pass through)."""

    def __init__(self, inner: ObjectStore, lease: Lease) -> None:
        self.inner, self.lease, self.root = inner, lease, inner.root

    def uri(self, key: str) -> str:
        return self.inner.uri(key)

    def get(self, key: str) -> bytes:
        return self.inner.get(key)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def list(self, prefix: str) -> list[str]:
        return self.inner.list(prefix)

    def get_with_etag(self, key: str) -> tuple[bytes, str] | None:
        return self.inner.get_with_etag(key)

    def put(self, key: str, data: bytes) -> None:
        self.lease.check()
        self.inner.put(key, data)

    def put_if(self, key: str, data: bytes, *, etag: str | None) -> None:
        self.lease.check()
        self.inner.put_if(key, data, etag=etag)

    def delete(self, key: str) -> None:
        self.lease.check()
        self.inner.delete(key)
