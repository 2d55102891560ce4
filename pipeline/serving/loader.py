"""Per-tenant pointer polls and release loads, off the request path.

Each tenant that serves (or is configured in RECSYS_SERVING_TENANTS) has one asyncio task
that polls its pointer every `release_poll_seconds` and loads a new release in a thread of
its own pool (`ReleaseCache.poll`, under that tenant's lock only). A request reads
`ReleaseCache.current` and never waits for a poll; only a request for a tenant with nothing
loaded yet waits, for that tenant's first poll alone, at most `cold_wait_seconds`. So one
tenant's slow S3 read or big load never delays another tenant's requests.

A tenant whose pointer says it has published nothing gets no poll loop (a request asks again
after a poll period), unless it is configured: random tenant ids cannot pile up tasks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from pipeline.config import Settings
from pipeline.serving.live import LiveRelease
from pipeline.serving.releases import ReleaseCache

log = logging.getLogger(__name__)
MIN_POLL_SECONDS = 0.05  # RECSYS_RELEASE_POLL_SECONDS=0 (tests) must not spin


class Loaders:
    def __init__(self, cache: ReleaseCache, poll_seconds: float, keep: frozenset[str] = frozenset(), workers: int = 8):
        self.cache = cache
        self.poll_seconds = max(poll_seconds, MIN_POLL_SECONDS)
        self.keep = keep
        self.pool = ThreadPoolExecutor(max(workers, len(keep)), thread_name_prefix="release-loader")
        self.started = time.monotonic()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._first: dict[str, asyncio.Event] = {}
        self._ended: dict[str, float] = {}
        self._closing = False

    def start(self) -> None:
        """Preload the configured tenants (called in lifespan: /readyz waits for them)."""
        for tenant in sorted(self.keep):
            self.ensure(tenant)

    def ensure(self, tenant: str) -> asyncio.Event:
        """The tenant's poll task (started if needed); the event is set once its first poll is done."""
        task = self._tasks.get(tenant)
        stale = (
            task is not None and task.done() and time.monotonic() - self._ended.get(tenant, 0.0) >= self.poll_seconds
        )
        if task is None or stale:
            self._first[tenant] = asyncio.Event()
            self._tasks[tenant] = asyncio.get_running_loop().create_task(self._run(tenant), name=f"poll-{tenant}")
        return self._first[tenant]

    async def wait_first(self, tenant: str, timeout: float) -> LiveRelease | None:
        """For a request of a tenant with nothing loaded: its first poll, bounded by `timeout`."""
        first = self.ensure(tenant)
        if not first.is_set():
            try:
                await asyncio.wait_for(first.wait(), timeout)
            except TimeoutError:
                pass
        return self.cache.current(tenant)

    async def _run(self, tenant: str) -> None:
        loop = asyncio.get_running_loop()
        first = self._first[tenant]
        try:
            while not self._closing:  # the flag, not only the cancel, ends it (see close)
                try:
                    await loop.run_in_executor(self.pool, self.cache.poll, tenant)
                except Exception:  # poll logs what it can; this only keeps the loop alive
                    log.exception("tenant %s: release poll failed", tenant)
                first.set()
                if self.cache.current(tenant) is None and self.cache.outcome(tenant) == "absent":
                    if tenant not in self.keep:
                        return
                await asyncio.sleep(self.poll_seconds)
        finally:
            self._ended[tenant] = time.monotonic()
            first.set()

    def ready(self, timeout_s: float) -> tuple[str, int]:
        """("ok" | "loading" | "partial", tenants loaded): ok once every configured tenant is loaded or
        has definitely published nothing; partial after `timeout_s` without that."""
        loaded = sum(self.cache.current(t) is not None for t in self.keep)
        settled = all(self.cache.current(t) is not None or self.cache.outcome(t) == "absent" for t in self.keep)
        if settled:
            return "ok", loaded
        return ("partial" if time.monotonic() - self.started >= timeout_s else "loading"), loaded

    async def close(self) -> None:
        """Stop every poll loop; bounded, so a cancellation lost in a race cannot hang shutdown."""
        self._closing = True
        for task in self._tasks.values():
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks.values()), timeout=2.0)
        self.pool.shutdown(wait=False, cancel_futures=True)


def serving_tenants(settings: Settings) -> frozenset[str]:
    """RECSYS_SERVING_TENANTS: '' none, '*' every tenant YAML in RECSYS_TENANTS_DIR, else a comma list."""
    raw = settings.serving_tenants.strip()
    if raw == "*":
        return frozenset(p.stem for p in settings.tenants_dir.glob("*.yaml") if not p.stem.startswith("_"))
    return frozenset(t.strip() for t in raw.split(",") if t.strip())
