"""A SASRec tenant end to end: the chain trains, gates and publishes it, serving loads its encoder,
and a posted event changes the user's next answer at once, to what follows that event's item.

The data has planted next-item structure (`synthetic.interactions(sequential=...)`): each item
has one usual follower, which the test reads off the data itself (the commonest next item).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from fastapi.testclient import TestClient

from pipeline.config import load_tenant_file
from pipeline.context import RunContext
from pipeline.index import build as faiss_index
from pipeline.index import search as ann
from pipeline.release import format as release
from pipeline.samples import synthetic
from pipeline.serving.app import create_app
from pipeline.stages import run_all
from pipeline.storage import LocalStore, open_store
from tests.conftest import isolated_settings

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

TENANT = "seqco"
URL = f"/v1/tenants/{TENANT}/users/{{}}/recommendations"
MODEL = {"kind": "sasrec", "dim": 16, "max_len": 10, "epochs": 15, "batch_size": 64, "learning_rate": 0.01}


def _followers(df: pd.DataFrame) -> dict[str, str]:
    """Each item's commonest next item over users' time-ordered events."""
    ordered = df.sort_values(["user_id", "timestamp"], kind="stable")
    same = ordered["user_id"].to_numpy()[1:] == ordered["user_id"].to_numpy()[:-1]
    pairs = pd.DataFrame({"a": ordered["item_id"].to_numpy()[:-1][same], "b": ordered["item_id"].to_numpy()[1:][same]})
    return pairs.groupby("a")["b"].agg(lambda s: s.value_counts().index[0]).to_dict()


@pytest.fixture(scope="module")
def served(tmp_path_factory, mlflow_uri):
    root: Path = tmp_path_factory.mktemp("sasrec")
    settings = isolated_settings(root, mlflow_uri, release_poll_seconds=0, rate_limit="")
    df = synthetic.interactions(n_users=150, n_items=50, mean_events=15, seed=3, sequential=0.9)
    src = root / "interactions.csv"
    df.to_csv(src, index=False)
    doc = {
        "tenant": TENANT,
        "source": {"uri": str(src), "columns": {c: c for c in ("user_id", "item_id", "timestamp", "rating")}},
        "model": MODEL,
        "validation": {"min_rows": 50},
    }
    path = Path(settings.tenants_dir) / f"{TENANT}.yaml"
    path.write_text(yaml.safe_dump(doc))
    ctx = RunContext(config=load_tenant_file(path), interval_end=datetime(2025, 6, 1, tzinfo=UTC), settings=settings)
    results = run_all(ctx)
    rel = release.load_release(open_store(settings.artifact_root), TENANT, results["publish"]["release_id"])
    return settings, rel, df, results


def _items(client: TestClient, user: str) -> list[str]:
    body = client.get(URL.format(user), params={"k": 5}).json()
    assert not body["fallback"], body
    return [i["item_id"] for i in body["items"]]


def test_the_chain_publishes_a_sasrec_release_with_its_encoder(served):
    _, rel, _, results = served
    assert results["publish"]["release_id"] and rel.model_meta["kind"] == "sasrec"
    assert rel.encoder is not None and rel.encoder.max_len == MODEL["max_len"]
    # the release's user vectors are the encoder over the release's seen lists: what a fold-in recomputes
    for row in range(0, len(rel.user_ids), 13):
        np.testing.assert_allclose(rel.encoder.encode(rel.seen(row)), rel.user_vectors[row], atol=2e-5)


def test_a_posted_event_changes_the_next_answer_to_what_follows_it(served):
    settings, rel, df, _ = served
    follower = _followers(df)
    moved = 0
    with TestClient(create_app(settings)) as client:
        for row in range(0, 60, 6):
            user = rel.user_ids[row]
            seen = set(rel.item_ids[rel.seen(row)])
            # an unseen item whose usual follower is unseen too, and not already recommended first
            before = _items(client, user)
            item = next(i for i in sorted(follower) if i not in seen and follower[i] not in seen | {i, before[0]})
            posted = client.post(
                f"/v1/tenants/{TENANT}/events",
                json={"events": [{"user_id": user, "item_id": item, "event_type": "view"}]},
            ).json()
            assert posted["users_folded_in"] == 1 and not posted["degraded"]
            after = _items(client, user)
            assert after != before and item not in after  # the new item is seen now
            moved += follower[item] == after[0]
    assert moved >= 7  # the planted follower of the posted item comes first for most users


def test_a_sasrec_release_without_its_encoder_is_refused(tmp_path):
    """A release that says sasrec but whose weights are bare factor tables could not fold users in."""
    rng = np.random.default_rng(0)
    users, items = rng.standard_normal((3, 8)).astype(np.float32), rng.standard_normal((5, 8)).astype(np.float32)
    files = release.files_from_vectors(
        ["u0", "u1", "u2"], [f"i{j}" for j in range(5)], users, items,
        np.array([0, 1, 2, 3]), np.array([0, 1, 2], dtype=np.int32),
        index_bytes=ann.serialize(faiss_index.build_index(items)[0]),
        model_meta={"kind": "sasrec", "config": {**MODEL, "dim": 8}},
    )  # fmt: skip
    store = LocalStore(tmp_path)
    rid = release.release_id_for("r1", files)
    release.write_release(store, TENANT, rid, files, {"run_id": "r1", "data_interval_end": "2026-01-01"})
    with pytest.raises(release.ReleaseError, match="model.safetensors has no usable encoder"):
        release.load_release(store, TENANT, rid)
