"""The per-tenant rate limiter: sliding window counts, hand-computed with a fake wall clock, shared
by two limiters (two workers) through the real Redis, and still answering with Redis down."""

from __future__ import annotations

import asyncio
import logging

import pytest
import redis.asyncio as aredis

from pipeline.serving.breaker import OPEN, Breaker
from pipeline.serving.rate_limit import RateLimiter
from tests.conftest import REDIS_URL

pytestmark = pytest.mark.integration


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def hits(limiter: RateLimiter, tenant: str, n: int) -> list[float | None]:
    return [limiter.check(tenant) for _ in range(n)]


def test_the_sliding_window_counter_by_hand():
    clock = Clock(1_000_000.0)  # the start of a 10-second window (window no. 100,000)
    limiter = RateLimiter("10/10second", {}, None, "unused", clock=clock)
    assert hits(limiter, "acme", 10) == [None] * 10
    retry = limiter.check("acme")  # 10 in the current window: only the next one, once 1/10 of it slid out
    assert retry == pytest.approx(10.0 + 1.0)  # 11 s: at 1.1 windows, 10 x (1 - 0.1) = 9 <= 10 - 1
    clock.t += 15.0  # half-way through the next window: 10 x 0.5 = 5 counted, 5 left
    assert hits(limiter, "acme", 5) == [None] * 5
    retry = limiter.check("acme")  # 5 + 5 = 10: the previous window's weight must shrink by 1/10 more
    assert retry == pytest.approx(1.0)
    clock.t += 1.0
    assert limiter.check("acme") is None
    assert limiter.check("acme") is not None
    clock.t += 25.0  # two windows later everything has slid out
    assert hits(limiter, "acme", 10) == [None] * 10


def test_limits_are_per_tenant_all_or_nothing_and_overridable():
    clock = Clock(2_000_000.0)
    limiter = RateLimiter("3/second;4/minute", {"beta": "1/second", "free": ""}, None, "unused", clock=clock)
    # 3/second bites: 3 in this second, so the next second must slide 1/3 out: 4/3 s
    assert hits(limiter, "acme", 4) == [None, None, None, pytest.approx(4 / 3)]
    clock.t += 2.0  # the per-second limit is free again; per minute (same minute): 3 of 4 used, one left
    assert limiter.check("acme") is None
    assert limiter.check("acme") is not None
    c_second, c_minute = limiter.counters["acme"]
    assert c_second.count(int(clock.t)) == 1 and sum(c_minute.local.values()) == 4  # refusals took nothing
    assert hits(limiter, "beta", 2)[1] is not None and hits(limiter, "acme2", 3) == [None] * 3
    assert hits(limiter, "free", 1000) == [None] * 1000


def test_two_workers_share_one_budget_through_redis(redis_prefix):
    async def scenario() -> None:
        clock = Clock(3_000_000.0)
        a_client, b_client = aredis.Redis.from_url(REDIS_URL), aredis.Redis.from_url(REDIS_URL)
        a = RateLimiter("10/minute", {}, a_client, f"{redis_prefix}:rl", clock=clock)
        b = RateLimiter("10/minute", {}, b_client, f"{redis_prefix}:rl", clock=clock)
        try:
            assert hits(a, "acme", 6) == [None] * 6
            await a.sync()  # A flushes its 6
            assert hits(b, "acme", 1) == [None]
            await b.sync()  # B flushes 1 and reads 7
            assert hits(b, "acme", 3) == [None] * 3  # 7 + 3 = 10
            assert b.check("acme") is not None
            await b.sync()
            await a.sync()  # A learns of B's 4 only now: a flush already sent is not sent twice
            assert int(await a_client.get(f"{redis_prefix}:rl:acme:10/60:{int(clock.t // 60)}")) == 10
            a.dirty.add("acme")
            await a.sync()
            assert a.check("acme") is not None
            ttl = await a_client.ttl(f"{redis_prefix}:rl:acme:10/60:{int(clock.t // 60)}")
            assert 60 < ttl <= 121  # keys expire once no window can count them
        finally:
            await a_client.aclose()
            await b_client.aclose()

    asyncio.run(scenario())


def test_hits_taken_while_a_flush_is_in_flight_are_kept(redis_prefix):
    async def scenario() -> None:
        clock = Clock(4_000_000.0)
        client = aredis.Redis.from_url(REDIS_URL)
        limiter = RateLimiter("100/minute", {}, client, f"{redis_prefix}:rl", clock=clock)
        try:
            hits(limiter, "acme", 5)
            flush = asyncio.create_task(limiter.sync())
            await asyncio.sleep(0)  # the pipeline is on its way with 5
            hits(limiter, "acme", 2)
            await flush
            (counter,) = limiter.counters["acme"]
            w = int(clock.t // 60)
            assert counter.local == {w: 2} and counter.shared[w] == 5 and counter.count(w) == 7
            await limiter.sync()
            assert counter.local == {} and counter.shared[w] == 7
        finally:
            await client.aclose()

    asyncio.run(scenario())


def test_redis_down_means_per_worker_counting_never_a_refusal_for_want_of_redis(caplog):
    async def scenario() -> None:
        clock = Clock(5_000_000.0)
        client = aredis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.05, socket_timeout=0.05)
        breaker = Breaker("redis", failures=2, reset_seconds=60)
        limiter = RateLimiter("5/minute", {}, client, "down:rl", breaker=breaker, clock=clock)
        try:
            with caplog.at_level(logging.WARNING):
                assert hits(limiter, "acme", 3) == [None] * 3
                await limiter.sync()  # fails: the hits stay local, to be flushed when Redis is back
                assert hits(limiter, "acme", 2) == [None] * 2
                await limiter.sync()
                assert limiter.check("acme") is not None  # this worker's own 5: still limited
                assert breaker.state == OPEN
                await limiter.sync()  # breaker open: not even tried
            assert caplog.text.count("rate limiter cannot reach Redis") == 1
            assert "acme" in limiter.dirty
        finally:
            await client.aclose()

    asyncio.run(scenario())


def test_close_is_bounded_when_a_flush_swallows_its_cancellation():
    """Python 3.11's asyncio can drop a cancellation that lands as an inner timeout fires (a
    Redis call's own); the flusher then kept looping and `close` (the app's shutdown) awaited
    it forever. Now its loop also stops on a flag and `close` waits a bounded time."""

    async def scenario() -> float:
        limiter = RateLimiter("100/second", {}, object(), "unused", sync_s=0.001)
        swallowed = 0
        flushing = asyncio.Event()

        async def sync() -> None:  # a flush that eats the cancellation, as the race does
            nonlocal swallowed
            flushing.set()
            try:
                await asyncio.sleep(0.2)
            except asyncio.CancelledError:
                swallowed += 1

        limiter.sync = sync  # type: ignore[method-assign]
        limiter.start()
        await flushing.wait()  # the cancellation lands inside a flush
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await asyncio.wait_for(limiter.close(), 5.0)  # before: never returned
        assert swallowed >= 1
        return loop.time() - t0

    assert asyncio.run(scenario()) < 1.0
