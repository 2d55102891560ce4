"""The serving API over a real published release: filters, diversity, reasons, rank, batch,
events with fold-in, rate limits, CORS, tenant-id fuzzing and cross-tenant isolation."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from pipeline.context import RunContext
from pipeline.data import event_log, extract
from pipeline.release import format as release
from pipeline.samples import synthetic
from pipeline.serving import rerank
from pipeline.serving.app import create_app, receive_time
from pipeline.serving.auth import hash_key
from pipeline.stages import run_all
from pipeline.storage import codecs, open_store, paths
from tests.conftest import INTERVAL_END, isolated_settings, write_tenant

pytestmark = pytest.mark.integration

CATEGORIES = ["news", "sport", "music", "film"]


def _catalog(items: pd.Series) -> pd.DataFrame:
    n = items.str[1:].astype(int)
    return pd.DataFrame(
        {
            "sku": items,
            "section": [CATEGORIES[i % 4] for i in n],
            "labels": [f"t{i % 3}|t{i % 5 + 10}" for i in n],
            "name": [f"Item number {i}" for i in n],
        }
    )


@pytest.fixture(scope="module")
def served(tmp_path_factory, mlflow_uri):
    """Tenant acme (with a catalog) published once for the module: (settings, release)."""
    root = tmp_path_factory.mktemp("serving")
    settings = isolated_settings(root, mlflow_uri, release_poll_seconds=0, rate_limit="")
    df = synthetic.interactions(n_users=200, n_items=120, mean_events=18, seed=1)
    catalog = root / "catalog.csv"
    _catalog(pd.Series(sorted(df["item_id"].unique()))).to_csv(catalog, index=False)
    cfg = write_tenant(
        settings,
        "acme",
        df,
        catalog={
            "uri": str(catalog),
            "columns": {"item_id": "sku", "category": "section", "tags": "labels", "title": "name"},
        },
    )
    results = run_all(RunContext(config=cfg, interval_end=INTERVAL_END, settings=settings))
    rel = release.load_release(open_store(settings.artifact_root), "acme", results["publish"]["release_id"])
    return settings, rel


@pytest.fixture
def client(served):
    settings, _ = served
    with TestClient(create_app(settings)) as c:
        yield c


URL = "/v1/tenants/acme/users/{}/recommendations"


def _items(body) -> list[str]:
    return [i["item_id"] for i in body["items"]]


def test_release_carries_catalog_attributes_and_recency_ordered_seen(served):
    _, rel = served
    assert "item_attributes.parquet" in rel.manifest["files"]
    assert set(rel.categories) == set(CATEGORIES)
    n = int(rel.item_ids[5][1:])
    assert rel.categories[rel.item_category[5]] == CATEGORIES[n % 4]
    assert set(rel.tags[rel.item_tags[5].indices]) == {f"t{n % 3}", f"t{n % 5 + 10}"}
    assert rel.item_titles[5] == f"Item number {n}"
    # publish precomputed each user's top items (seen ones excluded) for serving's fast path
    assert rel.candidates is not None and rel.candidates.shape == (len(rel.user_ids), min(100, len(rel.item_ids)))
    first = rel.candidates[0][rel.candidates[0] >= 0]
    assert len(first) and not np.isin(first, rel.seen(0)).any()


def test_filters_keep_k_and_only_allowed_items(client, served):
    _, rel = served
    user = rel.user_ids[0]
    cat_of = dict(zip(rel.item_ids, [rel.categories[c] for c in rel.item_category], strict=True))
    body = client.get(URL.format(user), params={"k": 10, "category": "sport"}).json()
    assert len(body["items"]) == 10 and {cat_of[i] for i in _items(body)} == {"sport"}
    body = client.get(URL.format(user), params={"k": 10, "exclude_category": ["sport", "news"]}).json()
    assert len(body["items"]) == 10 and not {cat_of[i] for i in _items(body)} & {"sport", "news"}
    tagged = set(rel.item_ids[rel.item_tags[:, rel.tags.get_loc("t1")].nonzero()[0]])
    body = client.get(URL.format(user), params={"k": 10, "tag": "t1"}).json()
    assert len(body["items"]) == 10 and set(_items(body)) <= tagged
    plain = _items(client.get(URL.format(user), params={"k": 10}).json())
    body = client.get(URL.format(user), params={"k": 10, "exclude": plain[:3]}).json()
    assert len(body["items"]) == 10 and not set(plain[:3]) & set(_items(body))
    assert _items(body)[:7] == plain[3:10]
    # filters leave the user's seen items out, and an unknown category matches nothing
    seen = set(rel.item_ids[rel.seen(0)])
    assert not seen & set(_items(client.get(URL.format(user), params={"k": 100, "category": "film"}).json()))
    assert client.get(URL.format(user), params={"category": "no-such"}).json()["items"] == []


def test_unknown_user_gets_popular_items_matched_on_attributes(client, served):
    _, rel = served
    body = client.get(URL.format("brand-new"), params={"k": 5, "category": "music"}).json()
    assert body["fallback"] is True and body["fallback_reason"] == "unknown_user_matched_on_attributes"
    music = rel.item_category == rel.categories.get_loc("music")
    pop = np.where(music, rel.item_popularity, -np.inf)
    expected = rel.item_ids[np.lexsort((np.arange(len(pop)), -pop))[:5]]
    assert _items(body) == list(expected)


def test_diversity_and_category_cap(client, served):
    _, rel = served
    user = rel.user_ids[1]
    plain = client.get(URL.format(user), params={"k": 10}).json()
    capped = client.get(URL.format(user), params={"k": 10, "max_per_category": 2}).json()
    cats = [rel.categories[rel.item_category[rel.item_ids.get_loc(i)]] for i in _items(capped)]
    assert len(cats) == 8 and max(cats.count(c) for c in set(cats)) <= 2  # 4 categories x 2
    diverse = client.get(URL.format(user), params={"k": 10, "diversity": 0.7}).json()

    def mean_sim(ids):
        v = rel.item_vectors[rel.item_ids.get_indexer(ids)]
        v = v / np.linalg.norm(v, axis=1, keepdims=True)
        s = v @ v.T
        return (s.sum() - len(ids)) / (len(ids) * (len(ids) - 1))

    assert len(diverse["items"]) == 10 and _items(diverse)[0] == _items(plain)[0]
    assert mean_sim(_items(diverse)) < mean_sim(_items(plain))


def test_mmr_hand_case():
    # three candidates; b nearly duplicates a, c is orthogonal: with diversity, c beats b
    vectors = np.array([[1.0, 0.0], [0.99, 0.14], [0.0, 1.0]], dtype=np.float32)
    rows, scores = np.array([0, 1, 2]), np.array([1.0, 0.9, 0.5], dtype=np.float32)
    assert list(rerank.mmr(rows, scores, vectors, 3, 0.0)) == [0, 1, 2]
    assert list(rerank.mmr(rows, scores, vectors, 3, 0.6)) == [0, 2, 1]
    cats = np.array([0, 0, 0, 1, -1])
    assert list(rerank.cap_per_category(np.arange(5), cats, 5, 1)) == [0, 3, 4]


def test_reasons_name_the_closest_seen_item(client, served):
    _, rel = served
    body = client.get(URL.format(rel.user_ids[2]), params={"k": 5, "explain": True}).json()
    seen = rel.seen(2)
    unit = rel.item_vectors / np.linalg.norm(rel.item_vectors, axis=1, keepdims=True)
    for item in body["items"]:
        row = rel.item_ids.get_loc(item["item_id"])
        best = seen[np.argmax(unit[seen] @ unit[row])]
        assert item["reason"]["because_item_id"] == rel.item_ids[best]
        assert item["reason"]["text"] == f"because you interacted with {rel.item_titles[best]}"
    assert all(i["reason"] is None for i in client.get(URL.format(rel.user_ids[2])).json()["items"])


def test_rank_orders_candidates_by_the_model(client, served):
    _, rel = served
    cands = list(rel.item_ids[[3, 1, 4, 1, 5, 9, 2, 6]]) + ["not-an-item"]
    body = client.post(f"/v1/tenants/acme/users/{rel.user_ids[7]}/rank", json={"item_ids": cands}).json()
    rows = rel.item_ids.get_indexer(_items(body))
    scores = rel.item_vectors[rows] @ rel.user_vectors[7]
    assert sorted(set(_items(body))) == sorted(set(cands) - {"not-an-item"})
    assert np.all(np.diff(scores) <= 1e-6) and body["unknown_item_ids"] == ["not-an-item"]
    assert body["release_id"] == rel.release_id and body["fallback"] is False
    cold = client.post("/v1/tenants/acme/users/nobody/rank", json={"item_ids": cands[:3]}).json()
    assert cold["fallback"] is True and len(cold["items"]) == 3


def test_batch_matches_single_requests(client, served):
    _, rel = served
    users = [*rel.user_ids[:5], "nobody"]
    body = client.post(
        "/v1/tenants/acme/recommendations/batch", json={"user_ids": users, "options": {"k": 7, "category": ["film"]}}
    ).json()
    assert body["release_id"] == rel.release_id and [r["user_id"] for r in body["results"]] == users
    for r in body["results"]:
        single = client.get(URL.format(r["user_id"]), params={"k": 7, "category": "film"}).json()
        assert _items(r) == _items(single) and r["fallback"] == single["fallback"]
    assert client.post("/v1/tenants/acme/recommendations/batch", json={"user_ids": []}).status_code == 422


def test_events_fold_in_at_once_and_reach_the_next_extract(client, served):
    settings, rel = served
    client.app.dependency_overrides[receive_time] = lambda: INTERVAL_END + timedelta(hours=13)  # they arrive then
    liked = list(rel.item_ids[[10, 11]])
    before = client.get(URL.format("fresh-user"), params={"k": 10}).json()
    assert before["fallback"] is True
    stamp = (INTERVAL_END + timedelta(hours=12)).isoformat()
    events = [{"user_id": "fresh-user", "item_id": i, "timestamp": stamp, "event_type": "click"} for i in liked]
    events.append({"user_id": "fresh-user", "item_id": "unknown-sku", "timestamp": stamp})
    r = client.post("/v1/tenants/acme/events", json={"events": events})
    assert r.status_code == 202, r.text
    assert r.json() == {
        "tenant": "acme",
        "release_id": rel.release_id,
        "accepted": 3,
        "users_folded_in": 1,
        "unknown_item_ids": ["unknown-sku"],
        "rejected": [],
        "degraded": False,
    }
    after = client.get(URL.format("fresh-user"), params={"k": 10, "explain": True}).json()
    assert after["fallback"] is False and not set(liked) & set(_items(after))
    assert {i["reason"]["because_item_id"] for i in after["items"]} <= set(liked)
    # an existing user's next answer changes too, and the new item is now excluded as seen
    user = rel.user_ids[3]
    old = _items(client.get(URL.format(user), params={"k": 10}).json())
    client.post("/v1/tenants/acme/events", json={"events": [{"user_id": user, "item_id": old[0], "timestamp": stamp}]})
    new = _items(client.get(URL.format(user), params={"k": 10}).json())
    assert old[0] not in new and new != old[1:]
    # the event log is what the next extract reads; a client retry adds nothing
    client.post("/v1/tenants/acme/events", json={"events": events})
    store = open_store(settings.artifact_root)
    logged = event_log.read(store, "acme", INTERVAL_END + timedelta(days=1))
    assert len(logged) == 4 and set(logged["event_type"]) == {"click", "interaction"}
    assert len(event_log.read(store, "acme", INTERVAL_END)) == 0  # not before their time
    cfg = release.read_manifest(store, "acme", rel.release_id)  # noqa: F841  (release untouched)
    from pipeline.config import load_tenant

    ctx = RunContext(
        config=load_tenant("acme", settings.tenants_dir),
        interval_end=INTERVAL_END + timedelta(days=1),
        settings=settings,
    )
    first = extract.extract(ctx)
    blob = store.get(ctx.key(paths.INTERACTIONS))
    assert first["event_log_rows"] == 4
    df = codecs.read_parquet(blob)
    assert (df["user_id"] == "fresh-user").sum() == 3
    assert extract.extract(ctx)["rows"] == first["rows"] and store.get(ctx.key(paths.INTERACTIONS)) == blob


def test_events_in_the_future_are_refused(client, served):
    settings, _ = served
    future = (datetime.now(UTC) + timedelta(days=2)).isoformat()
    past = INTERVAL_END.isoformat()
    events = [{"user_id": "u1", "item_id": "i1", "timestamp": t} for t in (future, past)]
    body = client.post("/v1/tenants/acme/events", json={"events": events}).json()
    assert body["accepted"] == 1 and body["rejected"] == [
        {"index": 0, "reason": "timestamp more than 1:00:00 in the future"}
    ]
    assert client.post("/v1/tenants/acme/events", json={"events": []}).status_code == 422


def test_metrics_expose_latency_fallbacks_and_live_release(client, served):
    _, rel = served
    client.get(URL.format(rel.user_ids[0]))
    client.get(URL.format("cold"))
    text = client.get("/metrics").text
    assert f'recsys_live_release{{release_id="{rel.release_id}",tenant="acme"}} 1.0' in text
    assert 'recsys_request_seconds_count{endpoint="recommendations",tenant="acme"}' in text
    assert 'recsys_fallbacks_total{reason="unknown_user",tenant="acme"}' in text


def test_rate_limit_answers_429_per_tenant(served, tmp_path):
    settings, _ = served
    keys = tmp_path / "keys.yaml"
    keys.write_text(f"acme:\n  keys: [{hash_key('a-key')}]\n  rate_limit: 3/minute\nbeta: [{hash_key('b-key')}]\n")
    limited = settings.model_copy(update={"auth_disabled": False, "api_keys_file": keys, "rate_limit": "5/minute"})
    with TestClient(create_app(limited)) as c:
        codes = [c.get(URL.format("x"), headers={"X-API-Key": "a-key"}).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        r = c.get(URL.format("x"), headers={"X-API-Key": "a-key"})
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        # beta has its own budget (default 5/minute); it has no release, so 404 until the limit
        beta = [
            c.get("/v1/tenants/beta/users/x/recommendations", headers={"X-API-Key": "b-key"}).status_code
            for _ in range(6)
        ]
        assert beta == [404] * 5 + [429]
        assert 'recsys_rate_limited_total{tenant="acme"} 2.0' in c.get("/metrics").text


def test_cors_is_configurable(served):
    settings, _ = served
    pre = {"Origin": "https://shop.example", "Access-Control-Request-Method": "GET"}
    with TestClient(create_app(settings)) as c:
        assert "access-control-allow-origin" not in c.options(URL.format("x"), headers=pre).headers
    with TestClient(create_app(settings.model_copy(update={"cors_origins": "https://shop.example"}))) as c:
        r = c.options(URL.format("x"), headers=pre)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://shop.example"
        r = c.options(URL.format("x"), headers={**pre, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers


@pytest.mark.parametrize(
    "raw",
    ["..", "%2E%2E", "..%2F..%2Fetc", "%2F", "a%2Fb", "%2e%2e%2fpasswd", "caf%C3%A9", "%E2%98%83", "*", "%2A", "a:b",
     "a%3Ab", "ACME", "-acme", "a" * 41, "%00", "acme%20", "%FF%FE"],
)  # fmt: skip
def test_fuzzed_tenant_ids_are_422_before_any_storage_call(served, raw, monkeypatch):
    settings, _ = served
    calls = []
    from pipeline.serving.releases import ReleaseCache

    for name in ("get", "fresh", "current", "poll"):  # every way serving reaches a tenant's release
        monkeypatch.setattr(ReleaseCache, name, lambda self, tenant, *a, **kw: calls.append(tenant))
    with TestClient(create_app(settings)) as c:
        # the exact bytes a server hands over (HTTP clients would normalise `..` away first)
        for method, path in (
            ("GET", f"/v1/tenants/{raw}/users/x/recommendations"),
            ("GET", f"/v1/tenants/{raw}/items/x/similar"),
            ("POST", f"/v1/tenants/{raw}/events"),
        ):
            status = c.portal.call(_raw_request, c.app, method, path.encode())
            assert status == 422, (raw, method, status)
    assert calls == []


async def _raw_request(app, method: str, raw_path: bytes) -> int:
    from urllib.parse import unquote

    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": unquote(raw_path.decode("latin-1"), errors="replace"),
        "raw_path": raw_path,
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"testserver")],
        "client": ("127.0.0.1", 1234),
        "server": ("testserver", 80),
    }
    await app(scope, receive, send)
    return sent[0]["status"]


def test_cross_tenant_access_never_leaks(served, tmp_path):
    """1,000 random (key, tenant, endpoint) pairs across tenants: always 403 or 404."""
    settings, rel = served
    store = open_store(settings.artifact_root)
    tenants = ["acme", "beta", "gamma", "delta", "omega"]
    # beta and gamma get releases of their own (same files, their own manifests and pointers)
    files = {n: release.read_file(store, "acme", rel.release_id, n, rel.manifest) for n in rel.manifest["files"]}
    for t in ("beta", "gamma"):
        manifest = {"run_id": rel.manifest["run_id"], "data_interval_end": INTERVAL_END.isoformat()}
        assert release.publish_release(store, t, files, manifest).release_id == rel.release_id
    keys = {t: f"key-of-{t}" for t in tenants}
    (tmp_path / "keys.yaml").write_text("".join(f"{t}: [{hash_key(k)}]\n" for t, k in keys.items()))
    secured = settings.model_copy(update={"auth_disabled": False, "api_keys_file": tmp_path / "keys.yaml"})
    rng = random.Random(7)
    user, item = rel.user_ids[0], rel.item_ids[0]
    logged_before = store.list("tenants/acme/events")  # earlier tests' events (filed by arrival day)
    with TestClient(create_app(secured)) as c:
        assert c.get(URL.format(user), headers={"X-API-Key": keys["acme"]}).status_code == 200
        for _ in range(1000):
            owner, target = rng.sample(tenants, 2)
            kind = rng.randrange(4)
            h = {"X-API-Key": keys[owner]}
            if kind == 0:
                r = c.get(f"/v1/tenants/{target}/users/{user}/recommendations", headers=h)
            elif kind == 1:
                r = c.get(f"/v1/tenants/{target}/items/{item}/similar", headers=h)
            elif kind == 2:
                r = c.post(f"/v1/tenants/{target}/users/{user}/rank", json={"item_ids": [item]}, headers=h)
            else:
                r = c.post(
                    f"/v1/tenants/{target}/events", json={"events": [{"user_id": "x", "item_id": item}]}, headers=h
                )
            assert r.status_code in (403, 404), (owner, target, kind, r.status_code)
            assert rel.release_id not in r.text and "items" not in r.json()
    assert not store.list("tenants/beta/events") and store.list("tenants/acme/events") == logged_before
