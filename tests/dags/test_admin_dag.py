"""The manual admin DAG: rollback and unpin from the Airflow UI's trigger form, run by dag.test()."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import get_settings
from pipeline.index import build as faiss_index
from pipeline.index import search as ann
from pipeline.release import format as release
from pipeline.storage import open_store, paths

pytestmark = [pytest.mark.integration]
TENANT = "admintest"


def _publish(store, seed: int, day: int) -> str:
    rng = np.random.default_rng(seed)
    users, items = rng.standard_normal((5, 4)).astype(np.float32), rng.standard_normal((7, 4)).astype(np.float32)
    files = release.files_from_vectors(
        [f"u{i}" for i in range(5)],
        [f"i{j}" for j in range(7)],
        users,
        items,
        np.arange(6, dtype=np.int64),
        np.arange(5, dtype=np.int32),
        index_bytes=ann.serialize(faiss_index.build_index(items)[0]),
        model_meta={"kind": "test", "seed": seed},
        popular_items=3,
    )
    manifest = {"run_id": f"run-{seed}", "data_interval_end": f"2026-03-{day:02d}T00:00:00+00:00"}
    out = release.publish_release(store, TENANT, files, manifest)
    assert out.flip.moved, out.flip
    return out.release_id


def test_admin_dag_rolls_back_and_unpins_from_the_trigger_form(dagbag):
    dag = dagbag.get_dag("recsys_admin")
    assert type(dag.timetable).__name__ == "NullTimetable"  # manual only
    assert set(dag.params.keys()) == {"action", "tenant", "to", "reason"}
    store = open_store(get_settings().artifact_root)
    first, second = _publish(store, 1, 1), _publish(store, 2, 2)

    dr = dag.test(run_conf={"action": "rollback", "tenant": TENANT, "reason": "bad release"})
    assert str(dr.state) == "success", {ti.task_id: str(ti.state) for ti in dr.get_task_instances()}
    doc = release.read_pointer(store, TENANT)[0]
    assert doc["release_id"] == first and doc["pinned"]["reason"] == "bad release"
    assert doc["pinned"]["by"].startswith("airflow:")
    assert store.exists(paths.pin_key(TENANT))

    dr = dag.test(run_conf={"action": "unpin", "tenant": TENANT})
    assert str(dr.state) == "success"
    assert "pinned" not in release.read_pointer(store, TENANT)[0] and not store.exists(paths.pin_key(TENANT))
    assert second in store.get(paths.blocklist_key(TENANT)).decode()  # stays out after the unpin

    dr = dag.test(run_conf={"action": "rollback", "tenant": "Not A Tenant"})  # refused, not retried
    assert str(dr.state) == "failed"
