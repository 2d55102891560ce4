"""The impression log: what every recommendation response showed, for the experiment analysis.

`tenants/{t}/impressions/dt=YYYY-MM-DD/{writer}-{seq}.parquet`, one object per batch, filed
under the UTC day it was served. One row per response: tenant, `recommendation_id`, user,
experiment, variant (arm), release id, the items in order (position = list index), each
item's team when two arms were interleaved, fallback, time.

Logging never blocks or fails a request: `log` appends to a bounded in-memory buffer under a
lock (no I/O) and returns; one background thread per process writes batches. The buffer
counts records until they are durably written, so a storage hiccup keeps them (retried with
backoff) but memory stays bounded: when it is full, new records are dropped and counted
(`recsys_impressions_dropped_total`). Each process writes under its own writer id, so a
restart or a second worker never overwrites a batch; `close` (the app's shutdown) flushes.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections import deque
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from prometheus_client import CollectorRegistry, Counter, Gauge

from pipeline.storage import ObjectStore, paths

log = logging.getLogger(__name__)

SCHEMA = pa.schema(
    [
        ("tenant", pa.string()),
        ("recommendation_id", pa.string()),
        ("user_id", pa.string()),
        ("experiment", pa.string()),
        ("variant", pa.string()),
        ("release_id", pa.string()),
        ("items", pa.list_(pa.string())),
        ("teams", pa.list_(pa.string())),
        ("fallback", pa.bool_()),
        ("served_at", pa.timestamp("us", tz="UTC")),
    ]
)


def prefix(tenant: str) -> str:
    return paths.impressions_prefix(tenant)


def day_of(key: str) -> str:
    """The dt= day of an impression object's key ('' if none)."""
    part = key.rsplit("/", 2)[-2] if key.count("/") >= 2 else ""
    return part[3:] if part.startswith("dt=") else ""


def record(
    tenant: str,
    recommendation_id: str,
    user_id: str,
    release_id: str,
    items: list[str],
    served_at: datetime,
    *,
    experiment: str | None = None,
    variant: str | None = None,
    teams: list[str] | None = None,
    fallback: bool = False,
) -> dict[str, Any]:
    return {
        "tenant": tenant,
        "recommendation_id": recommendation_id,
        "user_id": user_id,
        "experiment": experiment,
        "variant": variant,
        "release_id": release_id,
        "items": items,
        "teams": teams,
        "fallback": fallback,
        "served_at": served_at,
    }


def batch_bytes(rows: list[dict[str, Any]]) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), sink, compression="zstd")
    return sink.getvalue().to_pybytes()


class ImpressionLogger:
    """Bounded buffer + one writer thread. `log` is safe from any thread or the event loop."""

    def __init__(
        self,
        store: ObjectStore,
        registry: CollectorRegistry | None = None,
        *,
        capacity: int = 50_000,
        batch: int = 2_000,
        flush_seconds: float = 2.0,
        retry_seconds: float = 1.0,
        max_retry_seconds: float = 30.0,
    ) -> None:
        self.store = store
        self.capacity, self.batch = capacity, batch
        self.flush_seconds, self.retry_seconds, self.max_retry_seconds = flush_seconds, retry_seconds, max_retry_seconds
        self.writer = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._queue: deque[dict[str, Any]] = deque()
        self._held = 0  # records queued or in a batch not yet written: what `capacity` bounds
        self._seq = 0
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        registry = registry or CollectorRegistry()
        self.written = Counter("recsys_impressions_total", "Impressions written", ["tenant"], registry=registry)
        self.dropped = Counter(
            "recsys_impressions_dropped_total",
            "Impressions dropped: the bounded buffer was full (storage down or too slow)",
            ["tenant"],
            registry=registry,
        )
        self.failures = Counter(
            "recsys_impression_write_failures_total", "Failed impression batch writes (retried)", registry=registry
        )
        self.buffered = Gauge("recsys_impressions_buffered", "Impressions held in memory", registry=registry)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="impression-writer", daemon=True)
            self._thread.start()

    def log(self, row: dict[str, Any]) -> bool:
        """Queue one impression; False if it was dropped (buffer full). Never raises."""
        try:
            with self._cond:
                if self._held >= self.capacity:
                    self.dropped.labels(row.get("tenant", "?")).inc()
                    return False
                self._queue.append(row)
                self._held += 1
                if len(self._queue) >= self.batch:
                    self._cond.notify()
            return True
        except Exception:  # noqa: BLE001 - logging must never fail a request
            log.exception("impression not logged")
            return False

    def _take(self) -> list[dict[str, Any]]:
        with self._cond:
            if not self._stop and len(self._queue) < self.batch:
                self._cond.wait(self.flush_seconds)
            n = min(len(self._queue), self.batch)
            return [self._queue.popleft() for _ in range(n)]

    def _write(self, rows: list[dict[str, Any]]) -> None:
        """One object per (tenant, day) of the batch; raises if any put fails (the caller retries)."""
        groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for r in rows:  # one batch, grouped by where it is filed
            day = r["served_at"].astimezone(UTC).strftime("%Y-%m-%d")
            groups.setdefault((r["tenant"], day), []).append(r)
        for (tenant, day), part in sorted(groups.items()):
            if "_key" not in part[0]:
                self._seq += 1
                key = f"{prefix(tenant)}/dt={day}/{self.writer}-{self._seq:08d}.parquet"
                for r in part:
                    r["_key"] = key
            key = part[0]["_key"]
            if part[0].get("_done"):
                continue
            try:
                data = batch_bytes([{k: v for k, v in r.items() if not k.startswith("_")} for r in part])
            except (pa.ArrowException, TypeError, ValueError, AttributeError) as exc:  # a bug: retrying cannot help
                log.error("impressions: %d rows of tenant %s cannot be encoded (%s); dropped", len(part), tenant, exc)
                self.dropped.labels(tenant).inc(len(part))
                for r in part:
                    r["_done"] = True
                continue
            self.store.put(key, data)
            for r in part:
                r["_done"] = True
            self.written.labels(tenant).inc(len(part))

    def _flush(self, rows: list[dict[str, Any]], deadline: float | None = None) -> bool:
        """Write `rows`, retrying with backoff; False if the deadline passed first (rows still held)."""
        wait = self.retry_seconds
        while True:
            try:
                self._write(rows)
            except Exception as exc:  # noqa: BLE001 - a storage hiccup: keep the rows, retry
                self.failures.inc()
                log.warning("impressions: writing %d rows failed (%s); retrying in %.1f s", len(rows), exc, wait)
                if deadline is not None and time.monotonic() + wait > deadline:
                    return False
                with self._cond:
                    if self._stop and deadline is None:
                        return False
                    self._cond.wait(wait)
                wait = min(wait * 2, self.max_retry_seconds)
                continue
            with self._cond:
                self._held -= len(rows)
                self.buffered.set(self._held)
            return True

    def _run(self) -> None:
        while True:
            rows = self._take()
            if rows:
                if not self._flush(rows):
                    with self._cond:  # stopping during an outage: put them back for close()
                        self._queue.extendleft(reversed(rows))
                    return
            with self._cond:
                self.buffered.set(self._held)
                if self._stop and not self._queue:
                    return

    def close(self, timeout: float = 10.0) -> int:
        """Stop the writer and flush what is held, within `timeout`; returns the records lost."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        deadline = time.monotonic() + max(timeout, 0.0)
        while True:
            with self._cond:
                n = min(len(self._queue), self.batch)
                rows = [self._queue.popleft() for _ in range(n)]
            if not rows or not self._flush(rows, deadline):
                break
        with self._cond:
            lost = len(self._queue) + (len(rows) if rows else 0)
        if lost:
            log.error("impressions: %d not written at shutdown (storage unavailable)", lost)
        return lost
