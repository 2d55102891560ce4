"""Several processes opening a new MLflow sqlite DB at once (the first tasks of many tenants)."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from pipeline.ops import tracking


def _open(uri: str, ready, results) -> None:
    try:
        ready.wait()
        tracking.client(uri).search_experiments()
        results.put("ok")
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        results.put(f"{type(exc).__name__}: {exc}"[:300])


@pytest.mark.slow
def test_concurrent_first_opens_leave_a_working_db(tmp_path: Path):
    import mlflow  # noqa: F401 - imported once here, inherited by the forked openers

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ctx = multiprocessing.get_context("fork")
    ready, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_open, args=(uri, ready, results)) for _ in range(4)]
    for p in procs:
        p.start()
    ready.set()
    for p in procs:
        p.join(300)
    assert [results.get(timeout=5) for _ in procs] == ["ok"] * 4
    tracking.client(uri).create_experiment("after")  # the DB is whole: writes work
