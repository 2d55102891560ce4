"""An item-item release by hand: five items, a hand-written S, two users; every answer is worked
out in the comments. Serving, the Redis path, the export and the loader's checks on it."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from fastapi.testclient import TestClient

from pipeline.release import format as release
from pipeline.release import refresh
from pipeline.release.export import topk_table
from pipeline.serving.app import create_app
from pipeline.storage import codecs, open_store, paths
from pipeline.storage.redis import key, redis_client
from tests.conftest import REDIS_URL, isolated_settings

pytestmark = pytest.mark.integration

TENANT = "acme"
ITEMS = ["i0", "i1", "i2", "i3", "i4"]
# S[i, j]: what having seen item i adds to item j's score
S = sp.csr_matrix(
    np.array(
        [
            [0.0, 0.5, 0.2, 0.0, 0.0],  # i0
            [0.5, 0.0, 0.0, 0.4, 0.0],  # i1
            [0.0, 0.0, 0.0, 0.9, 0.0],  # i2
            [0.0, 0.0, 0.0, 0.0, 0.0],  # i3
            [0.0, 0.0, 0.1, 0.0, 0.0],  # i4
        ],
        dtype=np.float32,
    )
)
# u0 saw i1 then i0 (newest first: i0, i1); u1 saw i4. Distinct users per item: i0 1, i1 1, i4 1,
# i2 0, i3 0, so the popularity order (ties by index) is i0, i1, i4, i2, i3.
SEEN = {"u0": [0, 1], "u1": [4]}


def _files(similarity: sp.csr_matrix = S) -> dict[str, bytes]:
    lists = list(SEEN.values())
    indptr = np.concatenate(([0], np.cumsum([len(x) for x in lists]))).astype(np.int64)
    indices = np.concatenate(lists).astype(np.int32)
    return release.files_from_similarity(
        list(SEEN), ITEMS, similarity, indptr, indices, model_meta={"kind": "item_knn", "config": {}}
    )


@pytest.fixture
def served(tmp_path, mlflow_uri):
    settings = isolated_settings(tmp_path, mlflow_uri, release_poll_seconds=0, rate_limit="")
    store = open_store(settings.artifact_root)
    out = release.publish_release(store, TENANT, _files(), {"run_id": "r1", "data_interval_end": "2026-01-01"})
    return settings, store, out.release_id


def _get(client, user: str, **params) -> list[tuple[str, float]]:
    body = client.get(f"/v1/tenants/{TENANT}/users/{user}/recommendations", params={"k": 3, **params}).json()
    return [(i["item_id"], round(i["score"], 4)) for i in body["items"]]


def test_release_carries_s_and_no_vectors_or_index(served):
    _, store, rid = served
    manifest = release.read_manifest(store, TENANT, rid)
    assert set(manifest["files"]) == set(release.ITEM_ITEM_FILES)
    assert not {"items.faiss", "user_vectors.npy", "item_vectors.npy"} & set(manifest["files"])
    rel = release.load_release(store, TENANT, rid)
    assert rel.scoring == "item_item" and rel.index_bytes is None
    assert (rel.similarity != S).nnz == 0 and rel.similarity.dtype == np.float32
    assert rel.user_vectors.shape == (2, 0) and rel.item_vectors.shape == (5, 0)
    assert list(rel.popularity_rank) == [0, 1, 3, 4, 2]  # i0, i1, i4, i2, i3


def test_serving_answers_from_seen_items_and_s(served):
    settings, *_ = served
    with TestClient(create_app(settings)) as c:
        # u0: S[i0] + S[i1] = [.5, .5, .2, .4, 0]; seen i0, i1 out -> i3 .4, i2 .2, i4 0
        assert _get(c, "u0") == [("i3", 0.4), ("i2", 0.2), ("i4", 0.0)]
        # u1: S[i4] = i2 .1; then the zero scores in popularity order: i0, i1 (i4 is seen)
        assert _get(c, "u1") == [("i2", 0.1), ("i0", 0.0), ("i1", 0.0)]
        # reasons: i3 comes from i1 (S[i1, i3] .4), i2 from i0 (.2), nothing adds to i4
        body = c.get(f"/v1/tenants/{TENANT}/users/u0/recommendations", params={"k": 3, "explain": True}).json()
        reasons = [i["reason"] and i["reason"]["because_item_id"] for i in body["items"]]
        assert reasons == ["i1", "i0", None]
        # filters: without i3, the next in line is i4
        assert _get(c, "u0", exclude=["i3"]) == [("i2", 0.2), ("i4", 0.0)]
        # an unknown user gets the popular items
        body = c.get(f"/v1/tenants/{TENANT}/users/zz/recommendations", params={"k": 3}).json()
        assert body["fallback"] and body["fallback_reason"] == "unknown_user"
        assert [i["item_id"] for i in body["items"]] == ["i0", "i1", "i4"]
        # similar to i1: its row of S (i0 .5, i3 .4), then zero scores by popularity: i4
        body = c.get(f"/v1/tenants/{TENANT}/items/i1/similar", params={"k": 3}).json()
        assert [(i["item_id"], round(i["score"], 4)) for i in body["items"]] == [("i0", 0.5), ("i3", 0.4), ("i4", 0.0)]
        # rank: u0's scores of the candidates, best first (seen ones included: the caller chose them)
        body = c.post(f"/v1/tenants/{TENANT}/users/u0/rank", json={"item_ids": ["i4", "i3", "i0", "nope"]}).json()
        assert [(i["item_id"], round(i["score"], 4)) for i in body["items"]] == [("i0", 0.5), ("i3", 0.4), ("i4", 0.0)]
        assert body["unknown_item_ids"] == ["nope"] and not body["fallback"]
        # batch: the same answers as one by one
        body = c.post(f"/v1/tenants/{TENANT}/recommendations/batch", json={"user_ids": ["u1", "zz", "u0"]}).json()
        got = [[i["item_id"] for i in r["items"]][:3] for r in body["results"]]
        assert got[0] == ["i2", "i0", "i1"] and got[1][:3] == ["i0", "i1", "i4"] and got[2][:3] == ["i3", "i2", "i4"]
        # diversity re-ranks by cosine of S rows: never a seen item, k distinct items
        div = _get(c, "u0", diversity=0.9)
        assert len({i for i, _ in div}) == 3 and not {"i0", "i1"} & {i for i, _ in div}


def test_events_update_the_seen_list_at_once(served):
    settings, *_ = served
    with TestClient(create_app(settings)) as c:
        body = c.post(f"/v1/tenants/{TENANT}/events", json={"events": [{"user_id": "u1", "item_id": "i2"}]}).json()
        assert body["users_folded_in"] == 1
        # u1 has seen i2, i4: S[i2] + S[i4] = i3 .9, i2 .1 -> i3, then i0, i1 by popularity
        assert _get(c, "u1") == [("i3", 0.9), ("i0", 0.0), ("i1", 0.0)]
        # a user the release does not know is scored from their first event on
        c.post(f"/v1/tenants/{TENANT}/events", json={"events": [{"user_id": "new", "item_id": "i0"}]})
        assert _get(c, "new") == [("i1", 0.5), ("i2", 0.2), ("i4", 0.0)]


def test_redis_path_scores_from_seen_keys_and_stores_the_fold_in(served, redis_prefix):
    settings, store, rid = served
    settings = settings.model_copy(update={"redis_url": REDIS_URL, "redis_prefix": redis_prefix})
    r = redis_client(REDIS_URL)
    rel = release.load_release(store, TENANT, rid)
    refresh.write_release(r, redis_prefix, rel)
    assert refresh.flip(r, redis_prefix, TENANT, rid, 60)[0]
    assert r.get(key(redis_prefix, TENANT, rid, "u", "u0")) == b""  # known, no vector
    assert np.frombuffer(r.get(key(redis_prefix, TENANT, rid, "seen", "u0")), np.int32).tolist() == [0, 1]
    assert r.hget(key(redis_prefix, TENANT, rid, "meta"), "scoring") == b"item_item"
    with TestClient(create_app(settings)) as c:
        assert _get(c, "u1") == [("i2", 0.1), ("i0", 0.0), ("i1", 0.0)]
        c.post(f"/v1/tenants/{TENANT}/events", json={"events": [{"user_id": "u1", "item_id": "i2"}]})
        assert np.frombuffer(r.get(key(redis_prefix, TENANT, rid, "fseen", "u1")), np.int32).tolist() == [2, 4]
        assert _get(c, "u1") == [("i3", 0.9), ("i0", 0.0), ("i1", 0.0)]
    with TestClient(create_app(settings)) as c:  # another worker sees the fold-in (it is in Redis)
        assert _get(c, "u1") == [("i3", 0.9), ("i0", 0.0), ("i1", 0.0)]


def test_export_ranks_like_serving(served):
    _, store, rid = served
    table = topk_table(release.load_release(store, TENANT, rid), 3)
    got = {
        u: list(zip(g["item_id"], g["score"].astype(float).round(4), strict=True)) for u, g in table.groupby("user_id")
    }
    assert got == {"u0": [("i3", 0.4), ("i2", 0.2), ("i4", 0.0)], "u1": [("i2", 0.1), ("i0", 0.0), ("i1", 0.0)]}


def test_loader_refuses_a_tampered_or_malformed_similarity(served):
    _, store, rid = served
    k = paths.release_key(TENANT, rid, "similarity_data.npy")
    data = bytearray(store.get(k))
    data[-1] ^= 0xFF
    store.put(k, bytes(data))
    with pytest.raises(release.ReleaseError, match="checksum mismatch on similarity_data.npy"):
        release.load_release(store, TENANT, rid)
    # well-formed checksums over a matrix that points past the catalog: refused all the same
    files = _files()
    assert codecs.read_npy(files["similarity_indices.npy"]).tolist() == [1, 2, 0, 3, 3, 2]
    files["similarity_indices.npy"] = codecs.npy_bytes(np.array([1, 2, 0, 3, 9, 2], dtype=np.int32))
    rid2 = release.release_id_for("r2", files)
    release.write_release(store, TENANT, rid2, files, {"run_id": "r2", "data_interval_end": "2026-01-02"})
    with pytest.raises(release.ReleaseError, match="similarity matrix disagrees with the id maps"):
        release.load_release(store, TENANT, rid2)
    # a model.json whose kind scores by vectors cannot come with S instead
    files = _files()
    files["model.json"] = codecs.json_bytes({"kind": "als", "config": {}})
    rid3 = release.release_id_for("r3", files)
    release.write_release(store, TENANT, rid3, files, {"run_id": "r3", "data_interval_end": "2026-01-03"})
    with pytest.raises(release.ReleaseError, match="'als', which scores by dot"):
        release.load_release(store, TENANT, rid3)
