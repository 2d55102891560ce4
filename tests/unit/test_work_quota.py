"""The per-tenant work quota: token buckets, hand-computed with a fake clock."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from pipeline.serving.admission import AdmissionMetrics, WorkQuota


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> Clock:
    return Clock()


def quota(spec: str, clock: Clock) -> WorkQuota:
    return WorkQuota(spec, AdmissionMetrics(CollectorRegistry()), clock=clock)


def test_a_bucket_refills_at_its_rate_and_a_refusal_costs_nothing(clock):
    q = quota("100/second", clock)
    assert q.charge("acme", 60) is None  # 100 -> 40
    assert q.charge("acme", 60) == pytest.approx(0.2)  # 20 units short at 100/s
    assert q.charge("acme", 40) is None  # the refusal took nothing: 40 -> 0
    assert q.exhausted("acme") == pytest.approx(0.01)  # one unit: 10 ms
    clock.t += 0.25  # +25 units
    assert q.exhausted("acme") is None
    assert q.charge("acme", 25) is None
    assert q.charge("acme", 1) == pytest.approx(0.01)
    clock.t += 10  # refills up to the bucket's size, never beyond
    assert q.charge("acme", 100) is None
    assert q.charge("acme", 1) is not None


def test_a_charge_bigger_than_the_window_is_refused_for_a_whole_window(clock):
    q = quota("100/second", clock)
    assert q.charge("acme", 101) == pytest.approx(1.0)
    assert q.charge("acme", 100) is None  # nothing was taken by the refusal


def test_every_limit_or_none_and_tenants_apart(clock):
    q = quota("100/second;150/minute", clock)
    assert q.charge("acme", 100) is None  # second: 0, minute: 50
    clock.t += 1.0  # second: 100, minute: 50 + 2.5
    assert q.charge("acme", 60) == pytest.approx((60 - 52.5) * 60 / 150)  # the minute limit binds
    assert q.charge("acme", 52) is None  # the refusal above took nothing from either bucket
    assert q.charge("noisy", 100) is None  # another tenant has its own buckets


def test_no_spec_means_no_quota(clock):
    q = quota("", clock)
    assert q.charge("acme", 10**9) is None and q.exhausted("acme") is None
    assert q.metrics.work.labels("acme")._value.get() == 10**9
