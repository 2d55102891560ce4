"""A circuit breaker per serving dependency (Redis, the object store).

After `failures` consecutive failures the breaker opens: callers skip the dependency at once
(serve degraded, or keep the release they have) instead of paying its timeout on every
request. After `reset_seconds` one caller is let through as a probe (half-open); its success
closes the breaker, its failure opens it for another cool-down.

Hand-rolled on purpose (about 60 lines): pybreaker, the maintained library, runs every
guarded call while holding its one lock (`CircuitBreaker.call`: `with self._lock:
return self.state.call(...)`), which would serialise every Redis read of the threadpool
behind the slowest one, and its asyncio support needs Tornado. Here the lock only guards
the counters; calls run outside it, from threads and from the event loop alike.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

CLOSED, HALF_OPEN, OPEN = 0, 1, 2
STATE_NAMES = {CLOSED: "closed", HALF_OPEN: "half-open", OPEN: "open"}


class Breaker:
    def __init__(
        self,
        name: str,
        failures: int = 5,
        reset_seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        on_state: Callable[[str, int], None] | None = None,
    ) -> None:
        self.name = name
        self.failures = max(1, failures)
        self.reset_seconds = reset_seconds
        self.clock = clock
        self.on_state = on_state
        self._lock = threading.Lock()
        self._state = CLOSED
        self._count = 0
        self._opened_at = 0.0
        self._probing = False
        if on_state is not None:
            on_state(name, CLOSED)

    @property
    def state(self) -> int:
        return self._state

    @property
    def is_open(self) -> bool:
        """Open and still cooling down: callers should not even try (no probe is taken)."""
        return self._state == OPEN and self.clock() - self._opened_at < self.reset_seconds

    def allow(self) -> bool:
        """Whether to call the dependency now; in half-open, only one probe at a time."""
        with self._lock:
            if self._state == CLOSED:
                return True
            if self._state == OPEN and self.clock() - self._opened_at >= self.reset_seconds:
                self._set(HALF_OPEN)
            if self._state == HALF_OPEN and not self._probing:
                self._probing = True
                return True
            return False

    def success(self) -> None:
        with self._lock:
            self._count = 0
            self._probing = False
            if self._state != CLOSED:
                self._set(CLOSED)

    def failure(self) -> None:
        with self._lock:
            self._count += 1
            self._probing = False
            if self._state == HALF_OPEN or (self._state == CLOSED and self._count >= self.failures):
                self._opened_at = self.clock()
                self._set(OPEN)

    def _set(self, state: int) -> None:
        self._state = state
        if self.on_state is not None:
            self.on_state(self.name, state)


class Unavailable(Exception):
    """A dependency could not be asked: down, too slow for its timeout, or its breaker open."""


class BreakerOpen(Unavailable):
    """Not even tried: the dependency's breaker is open (cooling down, or another caller probes)."""


def is_outage(exc: BaseException) -> bool:
    """Whether `exc` says the dependency is down or slow (worth retrying, counted by breakers),
    as opposed to a bad answer (a corrupt release, a malformed value) that a retry won't fix."""
    if isinstance(exc, (Unavailable, ConnectionError, TimeoutError)):
        return True
    if exc.__cause__ is not None and is_outage(exc.__cause__):  # e.g. a ReleaseError wrapping a read timeout
        return True
    try:
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        if isinstance(exc, (RedisConnectionError, RedisTimeoutError)):
            return True
    except ImportError:  # pragma: no cover
        pass
    try:
        from botocore.exceptions import BotoCoreError, ClientError

        if isinstance(exc, BotoCoreError):  # endpoint unreachable, connect/read timeouts, closed connections
            return True
        if isinstance(exc, ClientError):
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            return int(status) >= 500 or exc.response.get("Error", {}).get("Code") in ("SlowDown", "Throttling")
    except ImportError:  # pragma: no cover
        pass
    return False


def outage_types() -> list[type[Exception]]:
    """Exception types that mean "a dependency is down or slow", for serving's 503 handler."""
    types: list[type[Exception]] = [Unavailable, ConnectionError, TimeoutError]
    try:
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        types += [RedisConnectionError, RedisTimeoutError]
    except ImportError:  # pragma: no cover
        pass
    try:
        from botocore.exceptions import BotoCoreError

        types.append(BotoCoreError)
    except ImportError:  # pragma: no cover
        pass
    return types
