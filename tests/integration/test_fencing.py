"""Fencing: one writer per (tenant, interval); a second copy fails fast, a zombie's writes fail.

The lease's conditional writes run on both stores (the local folder's locked compare-and-swap,
S3's If-None-Match / If-Match through moto's HTTP server); the CLI test uses real processes.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from pipeline.context import RunContext
from pipeline.release import format as release
from pipeline.stages import run_stage
from pipeline.storage import LocalStore, paths
from pipeline.storage import lease as leases
from pipeline.storage.lease import FencedStore, Holder, LeaseHeld, LeaseLost
from tests.conftest import INTERVAL_END, write_tenant

pytestmark = pytest.mark.integration
RUN = paths.run_id_of(INTERVAL_END)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    request.getfixturevalue("s3_env")
    import boto3

    from pipeline.storage.s3 import S3Store

    bucket = f"lease-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return S3Store(f"s3://{bucket}/p")


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def take(store, holder, stage="extract", clock=None, **kw):
    return leases.acquire(store, "acme", RUN, holder, stage, ttl=60, clock=clock or Clock(), **kw)


def test_a_second_copy_fails_fast_naming_the_holder_and_how_to_take_over(store):
    first, second = Holder.cli(), Holder.cli()
    lease = take(store, first)
    with pytest.raises(LeaseHeld) as exc:
        take(store, second)
    msg = str(exc.value)
    assert f"[tenant acme, interval {RUN}, stage extract]" in msg and first.id in msg and second.id in msg
    assert "--takeover" in msg and "--interval-end 2025-04-01T00:00:00+00:00" in msg
    fenced = FencedStore(store, lease)
    fenced.put("tenants/acme/runs/x", b"1")  # the holder still writes
    assert store.get("tenants/acme/runs/x") == b"1"


def test_a_takeover_fences_the_old_holder_out(store):
    old = take(store, Holder.cli())
    new = take(store, Holder.cli(), takeover=True)
    assert new.generation == old.generation + 1
    zombie = FencedStore(store, old)
    with pytest.raises(LeaseLost, match=rf"generation {old.generation}\) lost this run's lease.*refusing to write"):
        zombie.put("tenants/acme/runs/x", b"zombie")
    with pytest.raises(LeaseLost):
        zombie.put_if(paths.pointer_key("acme"), b"{}", etag=None)
    with pytest.raises(LeaseLost):
        zombie.delete("tenants/acme/runs/x")
    assert not store.exists("tenants/acme/runs/x") and not store.exists(paths.pointer_key("acme"))
    FencedStore(store, new).put("tenants/acme/runs/x", b"new")
    assert store.get("tenants/acme/runs/x") == b"new"


def test_airflow_retries_continue_and_stale_duplicates_are_refused(store):
    run = lambda attempt: Holder.airflow("recsys_acme", "scheduled__2025-04-01", attempt)  # noqa: E731
    first = take(store, run(1), "train")
    retry = take(store, run(2), "train")  # the retry of the same task continues the run
    assert retry.generation == first.generation + 1
    with pytest.raises(LeaseLost):
        FencedStore(store, first).put("k", b"old try")  # the first try, still running, is fenced out
    with pytest.raises(LeaseHeld, match=r"try 1 of airflow:recsys_acme/scheduled__2025-04-01 is a stale duplicate"):
        take(store, run(1), "train")  # Celery delivers the old try again
    take(store, run(1), "evaluate")  # the next task of the same dag run continues
    with pytest.raises(LeaseHeld, match="being run by airflow:recsys_acme/scheduled__2025-04-01"):
        take(store, Holder.airflow("recsys_acme", "backfill__2025-04-01", 1), "extract")  # another dag run


def test_an_expired_or_released_lease_may_be_taken(store):
    clock = Clock()
    dead = take(store, Holder(id="airflow:x/y", process_bound=False), clock=clock)
    clock.now += 59
    with pytest.raises(LeaseHeld):
        take(store, Holder.cli(), clock=clock)
    clock.now += 2  # past the TTL without a heartbeat
    alive = take(store, Holder.cli(), clock=clock)
    assert alive.generation == dead.generation + 1
    alive.release()
    with pytest.raises(LeaseLost, match="released"):
        FencedStore(store, alive).put("k", b"after the run ended")
    assert take(store, Holder.cli(), clock=clock).generation == alive.generation + 1


def test_the_lease_of_a_dead_process_on_this_host_is_free(store):
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone = Holder(id="cli:gone", pid=int(proc.stdout))
    take(store, gone)
    assert take(store, Holder.cli()).generation == 2  # no --takeover needed: its process is gone


def test_heartbeats_keep_a_quiet_stage_alive(store):
    quiet = Holder(id="airflow:x/y", process_bound=False)
    lease = leases.acquire(store, "acme", RUN, quiet, "train", ttl=0.4)
    with lease.heartbeat():
        time.sleep(1.0)  # 2.5 TTLs without a write: the heartbeat thread renews every ttl/4
        with pytest.raises(LeaseHeld):
            leases.acquire(store, "acme", RUN, Holder.cli(), "train", ttl=0.4)
    time.sleep(0.6)  # no heartbeat any more: the lease expires
    leases.acquire(store, "acme", RUN, Holder.cli(), "train", ttl=0.4)


def test_racing_copies_cannot_both_take_the_lease(store):
    from concurrent.futures import ThreadPoolExecutor

    def try_take(_):
        try:
            return take(store, Holder.cli())
        except LeaseHeld:
            return None

    with ThreadPoolExecutor(8) as pool:
        won = [x for x in pool.map(try_take, range(8)) if x is not None]
    assert len(won) == 1


def test_stages_of_two_holders_are_fenced(settings, small_df):
    """In process: run A starts the interval; run B is refused; B takes over; A is fenced out."""
    cfg = write_tenant(settings, "acme", small_df, model={"factors": 4, "iterations": 2})
    a = RunContext(config=cfg, interval_end=INTERVAL_END, settings=settings, holder=Holder.cli())
    b = RunContext(config=cfg, interval_end=INTERVAL_END, settings=settings, holder=Holder.cli())
    run_stage("extract", a)
    with pytest.raises(LeaseHeld, match=a.run_holder.id):
        run_stage("extract", b)
    zombie, _ = a.take_lease("validate")  # A is about to write ...
    run_stage("extract", replace(b, takeover=True))  # ... when B takes over
    with pytest.raises(LeaseLost):
        zombie.write(paths.INTERACTIONS, b"half of another run")
    with pytest.raises(LeaseHeld, match=b.run_holder.id):
        run_stage("validate", a)
    assert a.read(paths.INTERACTIONS) != b"half of another run"
    assert not release.list_releases(a.store, "acme")
