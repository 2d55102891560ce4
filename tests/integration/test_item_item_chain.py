"""Tenants with `model: {kind: ease}` and `{kind: item_knn}` through the whole chain, then served:
what the API answers is the top of `score_seen` over the release's S, and the gate can judge a
challenger against an item-item champion."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import yaml
from fastapi.testclient import TestClient

from pipeline.config import load_tenant_file
from pipeline.context import RunContext
from pipeline.features.dataset import Features
from pipeline.gate import champion
from pipeline.models.io import read_model
from pipeline.models.itemitem import score_seen, score_users
from pipeline.release import format as release
from pipeline.release.export import topk_table
from pipeline.samples import synthetic
from pipeline.serving.app import create_app
from pipeline.stages import GateRejected, run_all, run_stage
from pipeline.storage import codecs, paths
from tests.conftest import INTERVAL_END, isolated_settings, write_tenant

pytestmark = pytest.mark.integration


def item_item_tenant(settings, tenant: str, df, model: dict):
    """A tenant YAML whose `model` is exactly `model` (write_tenant merges into ALS's fields)."""
    write_tenant(settings, tenant, df)
    path = Path(settings.tenants_dir) / f"{tenant}.yaml"
    doc = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**doc, "model": model}))
    return load_tenant_file(path)


@pytest.fixture(scope="module", params=["ease", "item_knn"])
def chain(request, tmp_path_factory, mlflow_uri):
    root = tmp_path_factory.mktemp(request.param)
    settings = isolated_settings(root, mlflow_uri, release_poll_seconds=0, rate_limit="")
    df = synthetic.interactions(n_users=200, n_items=120, mean_events=18, seed=1)
    cfg = item_item_tenant(settings, "acme", df, {"kind": request.param})
    ctx = RunContext(config=cfg, interval_end=INTERVAL_END, settings=settings)
    results = run_all(ctx)
    return ctx, results, release.load_release(ctx.store, "acme", results["publish"]["release_id"])


def expected_top(rel: release.Release, seen: np.ndarray, k: int) -> tuple[list[str], np.ndarray]:
    """Top-k of score_seen with the seen items out, equal scores to the more popular item."""
    s = score_seen(rel.similarity, seen)
    s[seen] = -np.inf
    top = np.lexsort((rel.popularity_rank, -s))[:k]
    return list(rel.item_ids[top]), s[top]


def test_the_chain_publishes_s_and_what_is_evaluated_is_served(chain):
    ctx, results, rel = chain
    kind = ctx.config.model.kind
    assert results["train"]["kind"] == kind and results["publish"]["pointer_moved"]
    assert results["index"]["kind"] == "item_item" and not ctx.store.exists(ctx.key(paths.INDEX))
    manifest = rel.manifest
    assert (
        set(release.ITEM_ITEM_FILES)
        <= set(manifest["files"])
        <= set(release.ITEM_ITEM_FILES) | set(release.OPTIONAL_FILES)
    )
    assert manifest["model"] == kind and manifest["index"]["nnz"] == rel.similarity.nnz == manifest["similarity_nnz"]
    model = read_model(ctx, paths.REFITTED)
    assert (rel.similarity != model.similarity()).nnz == 0
    # a FAISS file left by an earlier vector model of this interval is removed, never published
    ctx.store.put(ctx.key(paths.INDEX), b"stale")
    assert run_stage("index", ctx) == results["index"] and not ctx.store.exists(ctx.key(paths.INDEX))
    # the release's seen lists are the refit model's X: serving scores users exactly as evaluation did
    for row in (0, 17, len(rel.user_ids) - 1):
        offline = score_users(model.interactions(), model.similarity(), np.array([row]))[0]
        np.testing.assert_allclose(score_seen(rel.similarity, rel.seen(row)), offline, rtol=1e-5, atol=1e-6)


def test_served_recommendations_similar_items_events_and_export(chain):
    ctx, _, rel = chain
    url = "/v1/tenants/acme/users/{}/recommendations"
    with TestClient(create_app(ctx.settings)) as c:
        for row in (0, 17, 150):
            body = c.get(url.format(rel.user_ids[row]), params={"k": 10}).json()
            items, scores = expected_top(rel, rel.seen(row), 10)
            assert not body["fallback"] and [i["item_id"] for i in body["items"]] == items
            np.testing.assert_allclose([i["score"] for i in body["items"]], scores, rtol=1e-5, atol=1e-6)
        # similar items: the top of the item's row of S
        body = c.get(f"/v1/tenants/acme/items/{rel.item_ids[5]}/similar", params={"k": 5}).json()
        row = rel.similarity[5].toarray().ravel()
        row[5] = -np.inf
        assert [i["item_id"] for i in body["items"]] == list(rel.item_ids[np.lexsort((rel.popularity_rank, -row))[:5]])
        # events: the user's next recommendations come from the new seen list
        user, before = rel.user_ids[0], [i["item_id"] for i in c.get(url.format(rel.user_ids[0])).json()["items"]]
        new = before[:3]
        events = [
            {"user_id": user, "item_id": i, "timestamp": f"2025-04-0{n + 2}T00:00:00Z"} for n, i in enumerate(new)
        ]
        assert c.post("/v1/tenants/acme/events", json={"events": events}).json()["users_folded_in"] == 1
        seen = np.concatenate((rel.item_ids.get_indexer(new[::-1]), rel.seen(0)))
        after = c.get(url.format(user), params={"k": 10}).json()
        assert [i["item_id"] for i in after["items"]] == expected_top(rel, seen, 10)[0]
        assert not set(new) & {i["item_id"] for i in after["items"]}
        # an unknown user: the popular fallback
        body = c.get(url.format("nobody"), params={"k": 5}).json()
        assert body["fallback"] and [i["item_id"] for i in body["items"]] == list(rel.item_ids[rel.popular[:5]])
    table = topk_table(rel, 10)
    assert table["user_id"].nunique() == len(rel.user_ids)
    first = table[table["user_id"] == rel.user_ids[17]]
    assert list(first["item_id"]) == expected_top(rel, rel.seen(17), 10)[0]


def test_gate_scores_an_item_item_champion_from_its_s(settings, small_df):
    """An EASE release is live; an ALS challenger is paired with it on the fresh holdout."""
    early_cfg = item_item_tenant(settings, "acme", small_df, {"kind": "ease"})
    early = RunContext(config=early_cfg, interval_end=datetime(2025, 3, 1, tzinfo=UTC), settings=settings)
    champ_id = run_all(early)["publish"]["release_id"]
    late = RunContext(config=write_tenant(settings, "acme", small_df), interval_end=INTERVAL_END, settings=settings)
    try:
        run_all(late, until="gate")
    except GateRejected:
        pass
    decision = codecs.read_json(late.store.get(late.key(paths.DECISION)))
    assert decision["basis"] == "same_holdout" and decision["champion_release_id"] == champ_id
    paired = codecs.read_parquet(late.store.get(late.key(paths.PAIRED)))
    assert len(paired) == decision["ci"]["users"] and paired["champion"].between(0, 1).all()
    assert paired["champion"].mean() > 0
    # the champion's lists are the top of score_seen over ITS seen lists and S, in this run's item space
    champ = release.load_release(late.store, "acme", champ_id)
    feats = Features.read(late)
    user_ids = feats.users["user_id"].astype(str).to_numpy()
    crows = champ.user_ids.get_indexer(user_ids[paired["user_idx"]])
    rows = paired["user_idx"].to_numpy()[crows >= 0][:5]
    assert len(rows) == 5  # users the champion knows (the others get its popular items)
    top = champion._champion_top(champ, feats, rows, 10, None)
    irow = champ.item_ids.get_indexer(feats.items["item_id"].astype(str).to_numpy())
    for n, u in enumerate(rows):
        crow = champ.user_ids.get_loc(user_ids[u])
        s = np.full(feats.n_items, -np.inf, dtype=np.float32)
        s[irow >= 0] = score_seen(champ.similarity, champ.seen(crow))[irow[irow >= 0]]
        np.testing.assert_allclose(np.sort(s[top[n]])[::-1], np.sort(s)[::-1][:10], rtol=1e-5, atol=1e-6)
