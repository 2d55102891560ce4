"""How late the worker's event loop runs: the queueing that admission control cannot see.

Admission's semaphore measures the wait of requests that reached the application. When the
worker's CPU is saturated the queue forms earlier, in the loop itself: requests already parsed
wait in its ready queue behind one another, and the semaphore stays free while each waits 100+
ms (at 2.5x capacity on 2 cores: admitted p99 205 ms). A timer that asks to wake every `tick_s`
and measures how late it woke sees that queue directly (the technique of Node's `toobusy`).

Shedding follows the same controlled-delay rule as the semaphore: a single late tick is a GC
pause or a scheduler hiccup and is absorbed; lag above `target_s` on every tick for a whole
`interval_s` is overload, and then new requests get 503 at once (the cheapest answer there is,
so the loop catches up) until a tick comes back on time.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable


class LoopLag:
    def __init__(
        self, target_s: float, interval_s: float, tick_s: float = 0.01, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        self.target_s = target_s
        self.interval_s = interval_s
        self.tick_s = tick_s
        self.clock = clock
        self.lag = 0.0
        self.late_since: float | None = None  # first tick of the current run of late ticks
        self.overloaded = False
        self._task: asyncio.Task | None = None

    def observe(self, lag: float, now: float) -> None:
        """One tick's lateness, measured at `now`."""
        self.lag = lag
        if lag <= self.target_s:
            self.late_since, self.overloaded = None, False
            return
        if self.late_since is None:
            self.late_since = now  # one late tick alone (a stall now over) never sheds
        self.overloaded = now - self.late_since >= self.interval_s

    async def run(self) -> None:
        while True:
            due = self.clock() + self.tick_s
            await asyncio.sleep(self.tick_s)
            now = self.clock()
            self.observe(max(0.0, now - due), now)

    def ensure_started(self) -> None:
        """Start on the server's loop (called from the first request: middleware has no lifespan)."""
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self.late_since, self.overloaded = None, False  # a new loop (a test client): its own lag
            self._task = loop.create_task(self.run(), name="loop-lag")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
