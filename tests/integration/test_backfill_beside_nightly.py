"""A 30-day backfill, run twice, while the nightly run of the newest interval publishes.

Each backfill day and the nightly run are separate dag runs (their own lease holders). The
nightly run's stages are interleaved with the backfill's days in one thread, so the overlap
is the same every time: the nightly run extracts (rewriting the history days its lookback
shares with the backfill) and publishes while the backfill is half done.
"""

from __future__ import annotations

import hashlib
from datetime import timedelta

import pytest

from pipeline.context import RunContext
from pipeline.release import format as release
from pipeline.samples import synthetic
from pipeline.stages import STAGES, run_all, run_stage
from pipeline.storage import paths
from pipeline.storage.lease import Holder
from tests.conftest import INTERVAL_END, write_tenant
from tests.integration.fast_tenant import FAST

pytestmark = [pytest.mark.integration, pytest.mark.slow]
DAYS = 30


def history(store) -> dict[str, str]:
    return {k: hashlib.sha256(store.get(k)).hexdigest() for k in store.list(paths.history_prefix("acme") + "/")}


def test_backfill_twice_beside_the_nightly_run_gives_the_same_history_and_pointer(settings):
    df = synthetic.interactions(n_users=150, n_items=60, mean_events=18, seed=2, days=100)
    cfg = write_tenant(settings, "acme", df, **FAST, schedule="0 0 * * *", validation={"min_rows": 5})

    def ctx(end, holder: str) -> RunContext:
        return RunContext(
            config=cfg, interval_end=end, settings=settings, holder=Holder.airflow("recsys_acme", holder, 1)
        )

    nightly_end = INTERVAL_END
    days = [nightly_end - timedelta(days=DAYS - d) for d in range(DAYS)]  # the 30 intervals before it
    # the nightly runs so far: the history up to the backfill's last day exists, as in production
    run_all(ctx(days[-1], "scheduled__before"))

    def one_pass(tag: str) -> str:
        nightly = ctx(nightly_end, f"{tag}_scheduled__{nightly_end:%Y-%m-%d}")
        stages = iter(STAGES)
        for day in days:
            run_all(ctx(day, f"{tag}_backfill__{day:%Y-%m-%d}"))
            if (name := next(stages, None)) is not None:  # the nightly run goes on beside the backfill
                run_stage(name, nightly)
        for name in stages:
            run_stage(name, nightly)
        return release.read_pointer(nightly.store, "acme")[0]["release_id"]

    store = ctx(nightly_end, "x").store
    first_pointer = one_pass("a")
    first = history(store)
    second_pointer = one_pass("b")
    assert history(store) == first  # byte-identical history
    assert second_pointer == first_pointer  # the same final pointer: the nightly run's release
    assert first_pointer.startswith(paths.run_id_of(nightly_end))
    backfilled = {paths.run_id_of(d) for d in days}
    archived = {r.split("-")[0] for r in release.list_releases(store, "acme")}
    assert backfilled <= archived  # every backfill day published a release, none of them went live
    assert len({k.split("/")[3] for k in first}) >= DAYS
