"""Admission control's controlled delay: a burst may wait, a sustained queue is shed fast.

The middleware is driven directly over ASGI on one event loop. The clock that decides burst or
overload is fake (deterministic); the waits themselves are real asyncio timeouts, chosen far
apart (a 2 s burst wait against a 5 ms overload wait) so a busy box cannot blur them.
"""

from __future__ import annotations

import asyncio
import time

from prometheus_client import CollectorRegistry

from pipeline.serving.admission import Admission, AdmissionMetrics
from pipeline.serving.loop_lag import LoopLag

SCOPE = {"type": "http", "method": "GET", "path": "/v1/tenants/acme/users/u1/recommendations"}


class Clock:
    def __init__(self) -> None:
        self.t = 500.0

    def __call__(self) -> float:
        return self.t


class Held:
    """An app whose requests each hold their admission slot until released."""

    def __init__(self) -> None:
        self.gates: list[asyncio.Event] = []
        self.entered = 0

    async def __call__(self, scope, receive, send) -> None:
        gate = asyncio.Event()
        self.gates.append(gate)
        self.entered += 1
        await gate.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


async def request(adm: Admission) -> tuple[int, float]:
    """(status, seconds) of one request through the middleware."""
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    started = time.perf_counter()
    await adm(SCOPE, receive, send)
    return sent[0]["status"], time.perf_counter() - started


def admission(app: Held, clock: Clock, registry: CollectorRegistry) -> Admission:
    return Admission(
        app,
        capacity=1,
        queue=10,
        queue_wait_s=2.0,
        retry_after_s=1,
        metrics=AdmissionMetrics(registry),
        overload_wait_s=0.005,
        interval_s=0.1,
        clock=clock,
    )


async def until(cond, timeout: float = 5.0) -> None:
    deadline = time.perf_counter() + timeout
    while not cond():
        assert time.perf_counter() < deadline, "condition not reached"
        await asyncio.sleep(0.001)


def test_a_burst_waits_and_a_queue_that_never_empties_is_shed_fast():
    async def scenario() -> None:
        clock, app, registry = Clock(), Held(), CollectorRegistry()
        adm = admission(app, clock, registry)
        a = asyncio.create_task(request(adm))  # takes the only slot and holds it
        await until(lambda: app.entered == 1)
        b = asyncio.create_task(request(adm))  # t=500.00: the queue was empty: a burst, may wait 2 s
        await until(lambda: adm.waiting == 1)
        clock.t += 0.05
        c = asyncio.create_task(request(adm))  # t=500.05: queue non-empty for 50 ms < 100 ms: still a burst
        await until(lambda: adm.waiting == 2)
        assert adm.wait_limit(clock()) == 2.0
        clock.t += 0.1  # t=500.15: non-empty for 150 ms > the interval: overload
        assert adm.wait_limit(clock()) == 0.005
        status_d, took_d = await request(adm)
        assert status_d == 503 and took_d < 1.0  # shed after ~5 ms, not after the 2 s burst wait
        assert registry.get_sample_value("recsys_admission_overloaded") == 1.0
        assert registry.get_sample_value("recsys_shed_total", {"reason": "queue_timeout"}) == 1.0
        for _ in range(3):  # release A, then B and C in turn: the burst's waiters are all served
            await until(lambda: any(not g.is_set() for g in app.gates))
            next(g for g in app.gates if not g.is_set()).set()
        assert [(await t)[0] for t in (a, b, c)] == [200, 200, 200]
        assert adm.waiting == 0 and adm.active == 0
        # the queue emptied: the next full house is a burst again, with the long wait
        clock.t += 5.0
        assert adm.wait_limit(clock()) == 2.0

    asyncio.run(scenario())


def test_a_full_queue_is_shed_at_once_whatever_the_delay():
    async def scenario() -> None:
        clock, app, registry = Clock(), Held(), CollectorRegistry()
        adm = Admission(
            app,
            capacity=1,
            queue=1,
            queue_wait_s=2.0,
            retry_after_s=3,
            metrics=AdmissionMetrics(registry),
            clock=clock,
        )
        a = asyncio.create_task(request(adm))
        await until(lambda: app.entered == 1)
        b = asyncio.create_task(request(adm))
        await until(lambda: adm.waiting == 1)
        status, took = await request(adm)
        assert status == 503 and took < 1.0
        assert registry.get_sample_value("recsys_shed_total", {"reason": "queue_full"}) == 1.0
        app.gates[0].set()
        await until(lambda: len(app.gates) == 2)
        app.gates[1].set()
        assert [(await t)[0] for t in (a, b)] == [200, 200]

    asyncio.run(scenario())


def test_loop_lag_sheds_only_when_late_for_a_whole_interval():
    lag = LoopLag(target_s=0.01, interval_s=0.1)
    lag.observe(0.12, now=10.0)  # one 120 ms stall (a GC pause): absorbed, not shed
    assert not lag.overloaded
    lag.observe(0.002, now=10.01)  # back on time
    assert not lag.overloaded and lag.late_since is None
    for i in range(5):  # late by 30 ms on every tick for 50 ms: not yet
        lag.observe(0.03, now=20.0 + 0.01 * i)
    assert not lag.overloaded
    for i in range(5, 11):  # late on every tick since 20.00: at 20.10 a whole interval
        lag.observe(0.03, now=20.0 + 0.01 * i)
    assert lag.overloaded and lag.late_since == 20.0
    lag.observe(0.004, now=20.11)
    assert not lag.overloaded and lag.late_since is None


def test_a_saturated_loop_gets_503s_at_once_and_serves_again_when_it_catches_up():
    async def scenario() -> None:
        registry = CollectorRegistry()
        lag = LoopLag(target_s=0.01, interval_s=0.05, tick_s=0.005)

        async def instant(scope, receive, send) -> None:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

        adm = Admission(
            instant, capacity=4, queue=4, queue_wait_s=1.0, retry_after_s=1, metrics=AdmissionMetrics(registry),
            loop_lag=lag,
        )  # fmt: skip
        assert (await request(adm))[0] == 200  # starts the monitor on this loop
        for _ in range(40):  # the loop is busy: 30 ms of work between yields, for over a second
            time.sleep(0.03)
            await asyncio.sleep(0)
            if lag.overloaded:
                break
        assert lag.overloaded
        status, took = await request(adm)
        assert status == 503 and took < 0.01
        assert registry.get_sample_value("recsys_shed_total", {"reason": "loop_lag"}) == 1.0
        await until(lambda: not lag.overloaded)  # idle again: the next tick is on time
        assert (await request(adm))[0] == 200
        await lag.close()

    asyncio.run(scenario())
