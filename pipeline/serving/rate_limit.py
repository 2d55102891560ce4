"""Per-tenant request limits shared by every worker through Redis, with no Redis round trip on
the request path.

The algorithm is the sliding window counter of the `limits` library (the previous window's
count weighted by how much of it still overlaps, plus the current window's count), and the
notation is its notation ('50/second;2000/minute', parsed by `limits`). What differs is where
the counts live: each worker counts its own hits in memory and a background task flushes them
and reads every worker's totals in one pipelined round trip every `sync_s` (50 ms), for the
counters touched since the last flush only. A check is then a few additions on the event loop.

Why not `limits`' own Redis limiter (what this replaced): it costs one Redis round trip per
request, the same as the user read itself. On a 2-core box that shares Redis with the workers,
each round trip is two context switches and a wake-up of Redis; `py-spy` showed the sends in
24% of a loaded worker's samples. And its in-memory storage starts a timer thread every few
milliseconds (see admission.py). Nothing maintained offers a locally batched counter.

The price is precision across workers: between two flushes a worker does not see the others'
hits, so a tenant can exceed its limit by at most (workers - 1) x its rate x `sync_s` (5% of
the limit with 2 workers and 50 ms). A worker's own hits are always counted exactly, so one
worker (and every test that uses one) enforces the limit exactly. When Redis is down or its
breaker is open, nothing is flushed: each worker goes on limiting its own traffic (a tenant
then gets up to `workers` times its limit), and a request is never refused for want of Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.serving.breaker import Breaker, is_outage

log = logging.getLogger(__name__)


@dataclass
class Counter:
    """One limit of one tenant: `amount` hits per `window` seconds."""

    key: str  # Redis key of the limit, without the window number
    amount: int
    window: float
    shared: dict[int, int] = field(default_factory=dict)  # window no. -> all workers' count, as last read
    local: dict[int, int] = field(default_factory=dict)  # window no. -> this worker's hits not yet flushed

    def count(self, w: int) -> int:
        return self.shared.get(w, 0) + self.local.get(w, 0)

    def estimate(self, now: float) -> tuple[int, float, float]:
        """(window no., the share of it elapsed, the sliding-window count at `now`)."""
        w = math.floor(now / self.window)
        elapsed = now / self.window - w
        return w, elapsed, self.count(w - 1) * (1.0 - elapsed) + self.count(w)

    def retry_after(self, w: int, elapsed: float) -> float:
        """Seconds until one more hit would fit (the count of window w only decays after it)."""
        cur, prev = self.count(w), self.count(w - 1)
        if cur + 1 > self.amount:  # only window w+1, once enough of w has slid out, has room
            at = 1.0 + max(0.0, 1.0 - (self.amount - 1) / cur)
        else:  # the previous window's weight must shrink
            at = max(elapsed, 1.0 - (self.amount - 1 - cur) / prev) if prev else elapsed
        return max(0.0, (at - elapsed) * self.window)

    def forget_before(self, w: int) -> None:
        for book in (self.shared, self.local):
            for old in [x for x in book if x < w - 1]:
                del book[old]


class RateLimiter:
    """`check(tenant)` on the request path (no I/O); `run()` as a background task flushes.

    `client`: a redis.asyncio client (None: counts stay in this process); `clock`: wall time,
    since window numbers must agree across workers and machines.
    """

    def __init__(
        self,
        default: str,
        overrides: dict[str, str],
        client: Any | None,
        key_prefix: str,
        breaker: Breaker | None = None,
        sync_s: float = 0.05,
        clock: Callable[[], float] = time.time,
    ) -> None:
        import limits

        def parse(spec: str) -> list[tuple[int, float]]:
            return [(int(i.amount), float(i.get_expiry())) for i in limits.parse_many(spec)] if spec else []

        self.default = parse(default)
        self.overrides = {t: parse(v) for t, v in overrides.items()}
        self.client = client
        self.prefix = key_prefix
        self.breaker = breaker
        self.sync_s = sync_s
        self.clock = clock
        self.counters: dict[str, list[Counter]] = {}
        self.dirty: set[str] = set()  # tenants with hits since the last flush
        self._task: asyncio.Task | None = None
        self._closing = False
        self._warned = False

    def _counters(self, tenant: str) -> list[Counter]:
        got = self.counters.get(tenant)
        if got is None:
            limits_ = self.overrides.get(tenant, self.default)
            got = self.counters[tenant] = [
                Counter(f"{self.prefix}:{tenant}:{amount}/{window:g}", amount, window) for amount, window in limits_
            ]
        return got

    def check(self, tenant: str) -> float | None:
        """None when allowed (and counted in every limit); else seconds until the tenant may
        retry (counted in none: a refused request costs the tenant nothing)."""
        counters = self._counters(tenant)
        if not counters:
            return None
        now = self.clock()
        states = [c.estimate(now) for c in counters]
        over = [c.retry_after(w, e) for c, (w, e, est) in zip(counters, states, strict=True) if est + 1 > c.amount]
        if over:
            return max(max(over), 1e-3)
        for c, (w, _, _) in zip(counters, states, strict=True):
            c.local[w] = c.local.get(w, 0) + 1
            c.forget_before(w)
        self.dirty.add(tenant)
        return None

    async def sync(self) -> None:
        """Flush this worker's hits and read every worker's counts: one pipelined round trip."""
        if self.client is None or not self.dirty:
            return
        if self.breaker is not None and self.breaker.is_open:
            return
        tenants, self.dirty = self.dirty, set()
        now = self.clock()
        flushed: list[tuple[Counter, int, int]] = []  # counter, window no., hits sent
        reads: list[tuple[Counter, int]] = []
        pipe = self.client.pipeline(transaction=False)
        touched = [c for tenant in tenants for c in self.counters.get(tenant, ())]
        for c in touched:  # first every flush, then every read: the reads see this worker's hits
            w = math.floor(now / c.window)
            c.forget_before(w)
            for x, n in sorted(c.local.items()):
                pipe.incrby(f"{c.key}:{x}", n)
                pipe.expire(f"{c.key}:{x}", math.ceil(2 * c.window) + 1)
                flushed.append((c, x, n))
            reads += [(c, w - 1), (c, w)]
        for c, x in reads:
            pipe.get(f"{c.key}:{x}")
        try:
            replies = await pipe.execute()
        except Exception as exc:  # noqa: BLE001 - availability first: count locally, say so once
            self.dirty |= tenants  # the hits stay local; flushed again when Redis answers
            if self.breaker is not None and is_outage(exc):
                self.breaker.failure()
            if not self._warned:
                log.warning("rate limiter cannot reach Redis (%s): limits are counted per worker until it does", exc)
                self._warned = True
            return
        if self.breaker is not None:
            self.breaker.success()
        self._warned = False
        for c, x, n in flushed:
            left = c.local.get(x, 0) - n  # hits taken while the pipeline was in flight stay local
            if left > 0:
                c.local[x] = left
            else:
                c.local.pop(x, None)
        for (c, x), value in zip(reads, replies[2 * len(flushed) :], strict=True):
            c.shared[x] = int(value or 0)

    async def run(self) -> None:
        while not self._closing:  # the flag, not only the cancel, ends it (see close)
            await asyncio.sleep(self.sync_s)
            await self.sync()

    def start(self) -> None:
        if self.client is not None and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run(), name="rate-limit-sync")

    async def close(self) -> None:
        """Stop the flusher after a last flush (a restart does not forget this worker's hits)."""
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            # bounded: a cancellation lost inside a Redis call's own timeout (Python 3.11's
            # asyncio can drop one that lands as the timeout fires) must not hang shutdown;
            # the flag ends the loop at its next pass
            await asyncio.wait({self._task}, timeout=1.0 + 2 * self.sync_s)
            self._task = None
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.sync(), 1.0)
