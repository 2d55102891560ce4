"""Admission control: shed load early and cheaply, and charge each tenant for the work it asks.

Two independent gates, both per worker process:

* `Admission` (ASGI middleware, on `/v1/` routes): at most `capacity` requests inside the
  application at once, `queue` more waiting; anything beyond gets 503 with Retry-After from the
  event loop, in well under a millisecond, without touching the body or the threadpool.
  Admitted requests then run on a machine that is not oversubscribed, so their p99 holds under
  2-3x overload instead of every request queueing behind every other (the failure of an
  unbounded threadpool queue: at 1,000 req/s offered, 145 req/s got through).
  How long a request may wait is controlled delay (CoDel as servers use it, Maurer, "Fail at
  Scale", ACM Queue 2015): while the queue has been empty at some point in the last
  `interval_s`, a burst may wait up to `queue_wait_s` (a GC pause, a scheduler hiccup or a
  release swap is absorbed, not turned into errors); once it has stayed non-empty for a whole
  interval the load is sustained, and waits are cut to `overload_wait_s`, so the excess is shed
  within milliseconds while admitted requests keep their p99. When the CPU itself is saturated
  the queue forms before this middleware, in the event loop: `loop_lag.LoopLag` watches it and,
  by the same rule, sheds every new request while the loop has been late for a whole interval.
  A fixed 20 ms wait did both
  badly: it shed requests during 30-80 ms stalls at 1,000 req/s (errors at half the box's
  capacity) and still let every admitted request of an overload wait the full 20 ms.
  Hand-rolled because nothing maintained fits: uvicorn's `--limit-concurrency` counts open
  keep-alive connections as well as requests (a client pool of idle connections would trip it)
  and sends no Retry-After; Starlette ships no limiter. It is an asyncio.Semaphore plus counters.
* `WorkQuota`: a per-tenant budget in work units (users x candidates, `limits.work_units`),
  a token bucket per (tenant, limit) in process memory (O(1) per charge, no Redis round trip
  on the request path); the limits are parsed with the `limits` library's notation. Not its
  `MemoryStorage`: that starts a new `threading.Timer` thread whenever the last one has run
  (every 10 ms under load), and `Thread.start` blocks the event loop until the new thread
  holds the GIL: 9% of a loaded worker's samples in py-spy, and a source of latency spikes.
  A batch of 1,000 users x k=100 costs 1,000
  times a single k=100 request, so one tenant's batches cannot eat everyone's CPU: over its
  budget it gets 429 with Retry-After while the others keep flowing. Once a tenant's budget is
  spent, its next POSTs (batch, rank, events: the requests with a body to parse) are refused by
  `Admission` from the path alone, before their body is read and before they take a slot: a
  flood of over-budget batches costs next to nothing. GETs skip that pre-check (they are cheap
  to parse; one check fewer on the hot path) and the route charges every request its exact cost.
"""

from __future__ import annotations

import asyncio
import threading
import time

from fastapi import HTTPException, Request
from prometheus_client import CollectorRegistry, Counter, Gauge

from pipeline.serving.limits import send_error
from pipeline.serving.loop_lag import LoopLag

GUARDED_PREFIX = "/v1/"  # health, readiness and metrics are never shed
TENANT_PREFIX = "/v1/tenants/"


class AdmissionMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.shed = Counter(
            "recsys_shed_total", "Requests answered 503 by admission control", ["reason"], registry=registry
        )
        self.in_flight = Gauge("recsys_in_flight_requests", "Requests inside the application now", registry=registry)
        self.queued = Gauge("recsys_queued_requests", "Requests waiting for admission now", registry=registry)
        self.overloaded = Gauge(
            "recsys_admission_overloaded",
            "1 while the admission queue has not emptied for a whole interval (waits cut short)",
            registry=registry,
        )
        self.work = Counter(
            "recsys_work_units_total", "Work charged (users x candidates)", ["tenant"], registry=registry
        )
        self.over_quota = Counter(
            "recsys_work_quota_exceeded_total", "429 answers for the work quota", ["tenant"], registry=registry
        )


class Admission:
    def __init__(
        self,
        app,
        capacity: int,
        queue: int,
        queue_wait_s: float,
        retry_after_s: int,
        metrics: AdmissionMetrics,
        quota_of=None,
        overload_wait_s: float = 0.005,
        interval_s: float = 0.1,
        clock=time.monotonic,
        loop_lag: LoopLag | None = None,
    ) -> None:
        """`quota_of()`: the app's WorkQuota or None (lifespan makes it after the stack is built).
        `queue_wait_s`: the longest wait in a burst; `overload_wait_s`: the wait once the queue has
        not emptied for `interval_s` (sustained overload)."""
        self.app = app
        self.quota_of = quota_of
        self.capacity = capacity
        self.queue = queue
        self.queue_wait_s = queue_wait_s
        self.overload_wait_s = min(overload_wait_s, queue_wait_s)
        self.interval_s = interval_s
        self.clock = clock
        self.retry_after = str(retry_after_s).encode()
        self.metrics = metrics
        self.active = 0
        self.waiting = 0
        self.last_empty = -float("inf")  # when the queue was last seen empty (clock())
        self._sem: asyncio.Semaphore | None = None  # made on the server's loop, at the first request
        self.loop_lag = loop_lag  # the loop's own queue (loop_lag.py); None: not watched

    def wait_limit(self, now: float) -> float:
        """How long a request arriving `now` to a full house may wait (controlled delay)."""
        if self.waiting == 0 or now - self.last_empty <= self.interval_s:
            return self.queue_wait_s
        return self.overload_wait_s

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(GUARDED_PREFIX):
            await self.app(scope, receive, send)
            return
        quota = self.quota_of() if self.quota_of is not None else None
        if quota is not None and scope["method"] == "POST" and scope["path"].startswith(TENANT_PREFIX):
            tenant = scope["path"][len(TENANT_PREFIX) :].split("/", 1)[0]
            retry = quota.exhausted(tenant)
            if retry is not None:
                await quota.refuse(send, tenant, retry)
                return
        if self.loop_lag is not None:
            self.loop_lag.ensure_started()
            if self.loop_lag.overloaded:
                await self._shed(send, "loop_lag")
                return
        if self.capacity <= 0:
            await self.app(scope, receive, send)
            return
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.capacity)
        sem = self._sem
        if sem.locked():
            if self.waiting >= self.queue:
                await self._shed(send, "queue_full")
                return
            wait = self.wait_limit(self.clock())
            if self.waiting == 0:
                self.last_empty = self.clock()  # the queue was empty until this request
            self.waiting += 1
            self.metrics.queued.set(self.waiting)
            self.metrics.overloaded.set(wait < self.queue_wait_s)
            try:
                await asyncio.wait_for(sem.acquire(), wait)
            except TimeoutError:
                await self._shed(send, "queue_timeout")
                return
            finally:
                self.waiting -= 1
                self.metrics.queued.set(self.waiting)
                if self.waiting == 0:
                    self.last_empty = self.clock()
        else:
            self.last_empty = self.clock()
            await sem.acquire()
        self.active += 1
        self.metrics.in_flight.set(self.active)
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1
            self.metrics.in_flight.set(self.active)
            sem.release()

    async def _shed(self, send, reason: str) -> None:
        self.metrics.shed.labels(reason).inc()
        await send_error(
            send, 503, "the server is at capacity; retry after the delay", [(b"retry-after", self.retry_after)]
        )


class WorkQuota:
    """Per-tenant work budget (`limits` notation in units, e.g. '200000/second'); '' = none.

    One token bucket per (tenant, limit): it holds at most `amount` units, refills at `amount`
    per window, and a charge takes its units from every limit or from none (all or nothing,
    so a refused request costs the tenant nothing)."""

    def __init__(self, spec: str, metrics: AdmissionMetrics, clock=time.monotonic) -> None:
        import limits

        items = limits.parse_many(spec) if spec.strip() else []
        self.limits = [(float(item.amount), float(item.get_expiry())) for item in items]
        self.metrics = metrics
        self.clock = clock
        self.buckets: dict[str, list[list[float]]] = {}  # tenant -> per limit [tokens, at]
        self.lock = threading.Lock()  # charges come from the loop and from threadpool routes

    def _levels(self, tenant: str, now: float) -> list[list[float]]:
        """The tenant's buckets, refilled up to `now`."""
        buckets = self.buckets.get(tenant)
        if buckets is None:
            buckets = self.buckets[tenant] = [[amount, now] for amount, _ in self.limits]
        for bucket, (amount, window) in zip(buckets, self.limits, strict=True):
            bucket[0] = min(amount, bucket[0] + (now - bucket[1]) * amount / window)
            bucket[1] = now
        return buckets

    def _wait(self, tenant: str, units: float, take: bool) -> float | None:
        """None when `units` fit in every limit (taken if `take`), else seconds until they would."""
        with self.lock:
            buckets = self._levels(tenant, self.clock())
            wait = 0.0
            for (tokens, _), (amount, window) in zip(buckets, self.limits, strict=True):
                if units > amount:
                    return window  # can never fit in one window: retrying will not help
                if tokens < units:
                    wait = max(wait, (units - tokens) * window / amount)
            if wait > 0:
                return wait
            if take:
                for bucket in buckets:
                    bucket[0] -= units
            return None

    def exhausted(self, tenant: str) -> float | None:
        """Seconds until the tenant may retry when not even one unit is left; else None (no charge)."""
        return self._wait(tenant, 1.0, take=False) if self.limits else None

    async def refuse(self, send, tenant: str, retry: float) -> None:
        self.metrics.over_quota.labels(tenant).inc()
        await send_error(
            send,
            429,
            f"work quota of tenant {tenant!r} exceeded (users x candidates per second); see Retry-After",
            [(b"retry-after", str(max(1, round(retry))).encode())],
        )

    def charge(self, tenant: str, units: int) -> float | None:
        """None when within budget (and charged); else seconds until the tenant may retry."""
        self.metrics.work.labels(tenant).inc(units)
        return self._wait(tenant, float(units), take=True) if self.limits else None


def charge(request: Request, tenant: str, units: int) -> None:
    """Charge `units` of work to the tenant, or raise 429 with Retry-After (a route calls it
    once it knows its work: after validation, before any search)."""
    quota: WorkQuota | None = getattr(request.app.state, "work_quota", None)
    if quota is None:
        return
    retry = quota.charge(tenant, units)
    if retry is not None:
        quota.metrics.over_quota.labels(tenant).inc()
        raise HTTPException(
            429,
            f"work quota of tenant {tenant!r} exceeded ({units} units asked: users x candidates)",
            headers={"Retry-After": str(max(1, round(retry)))},
        )
