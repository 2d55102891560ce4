"""Bounded input, admission control and per-tenant work quotas, over a real uvicorn server, plus
the precomputed-candidates fast path against the live search.

A tiny release written with the release writer (no training): 300 users x 200 items x 8 dims,
published for two tenants. Timing assertions carry wide margins (a shared 2-core box).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated

import httpx
import numpy as np
import pytest
from fastapi import Depends, Request
from fastapi.testclient import TestClient

from pipeline.config.settings import PROJECT_ROOT as ROOT
from pipeline.index import build as index
from pipeline.index import search as ann
from pipeline.release import candidates
from pipeline.release import format as release
from pipeline.serving import deps
from pipeline.serving.app import create_app
from pipeline.serving.auth import hash_key
from pipeline.serving.live import LiveRelease
from pipeline.storage import open_store
from tests.conftest import INTERVAL_END, isolated_settings
from tests.integration.test_serving_server import Server, _free_port

pytestmark = pytest.mark.integration

KEYS = {"acme": "acme-key", "noisy": "noisy-key"}
N_USERS, N_ITEMS, DIM = 300, 200, 8


def _files(with_candidates: bool) -> dict[str, bytes]:
    rng = np.random.default_rng(3)
    users = rng.normal(size=(N_USERS, DIM)).astype(np.float32)
    items = rng.normal(size=(N_ITEMS, DIM)).astype(np.float32)
    lengths = rng.integers(1, 30, N_USERS)
    indptr = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
    indices = np.concatenate([rng.choice(N_ITEMS, n, replace=False) for n in lengths]).astype(np.int32)
    built, info = index.build_index(items)
    index_bytes = ann.serialize(built)
    files = release.files_from_vectors(
        [f"u{u}" for u in range(N_USERS)],
        [f"i{i}" for i in range(N_ITEMS)],
        users,
        items,
        indptr,
        indices,
        index_bytes=index_bytes,
        model_meta={"kind": "als", "config": {"factors": DIM}},
    )
    if with_candidates:
        files[candidates.FILE] = candidates.file_bytes(index_bytes, info, items, users, indptr, indices, per_user=20)
        files[candidates.NEIGHBORS_FILE] = candidates.neighbors_bytes(index_bytes, info, items, per_item=20)
    return files


@pytest.fixture(scope="module")
def limited(tmp_path_factory, mlflow_uri):
    """Settings with auth on (a key per tenant), no request rate limit; acme and noisy published."""
    root = tmp_path_factory.mktemp("limits")
    keys_file = root / "keys.yaml"
    keys_file.write_text("".join(f"{t}: [{hash_key(k)}]\n" for t, k in KEYS.items()))
    settings = isolated_settings(
        root, mlflow_uri, release_poll_seconds=60, rate_limit="", auth_disabled=False, api_keys_file=keys_file
    )
    store = open_store(settings.artifact_root)
    files = _files(with_candidates=True)
    manifest = {"run_id": "20260101T000000Z", "data_interval_end": INTERVAL_END}
    for tenant in KEYS:
        assert release.publish_release(store, tenant, files, manifest).flip.moved
    return settings


def _h(tenant: str = "acme") -> dict[str, str]:
    return {"X-API-Key": KEYS[tenant]}


# ------------------------------------------------------------------ bounded input


class CountingReceive:
    """Outermost ASGI wrapper: counts the body bytes the server hands to the application."""

    def __init__(self, app) -> None:
        self.app = app
        self.received = 0

    async def __call__(self, scope, receive, send):
        async def counted():
            message = await receive()
            self.received += len(message.get("body", b""))
            return message

        await self.app(scope, counted, send)


def _raw_post(port: int, path: str, headers: dict[str, str], first: bytes) -> tuple[bytes, float]:
    """Send the headers and the first bytes of a body, then read the response (the rest is never sent)."""
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\n{head}\r\n".encode() + first)
        data = s.recv(65536)
    return data, time.perf_counter() - started


def _chunked_post(port: int, path: str, headers: dict[str, str], total: int) -> tuple[bytes, int]:
    """Stream a chunked body of up to `total` bytes, 64 KiB a chunk, until the server answers."""
    chunk = b"x" * 65536
    frame = b"%x\r\n%s\r\n" % (len(chunk), chunk)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n{head}\r\n".encode())
        sent = 0
        while sent < total:
            if select.select([s], [], [], 0)[0]:
                break  # the answer is there: stop sending
            try:
                s.sendall(frame)
            except OSError:
                break
            sent += len(chunk)
        return s.recv(65536), sent


def test_oversized_body_is_413_before_it_is_read(limited):
    """A declared 48 MB body: 413 at once, 0 bytes handed to the app; a chunked body is cut at the limit."""
    settings = limited.model_copy(update={"max_body_bytes": 1_000_000})
    counter = CountingReceive(create_app(settings))
    server = Server(settings)
    server.server.config.app = counter  # the real app behind the counting wrapper
    server.server.config.loaded = False
    with server:
        path = "/v1/tenants/acme/recommendations/batch"
        data, took = _raw_post(
            server.port,
            path,
            {**_h(), "Content-Type": "application/json", "Content-Length": str(48 * 2**20)},
            b'{"user_ids": [' + b'"u1",' * 10_000,
        )
        assert data.startswith(b"HTTP/1.1 413"), data[:200]
        assert b"over the limit" in data and took < 2.0
        assert counter.received == 0  # refused on the header: not one body byte read
        counter.received = 0
        data, sent = _chunked_post(server.port, path, _h(), total=48 * 2**20)  # no length: streamed
        assert data.startswith(b"HTTP/1.1 413"), data[:200]
        assert sent < 8 * 2**20  # answered while the client was still sending: cut near the limit
        assert counter.received < 1_000_000 + 2**20  # at most the limit and one read of the socket
        with httpx.Client(base_url=server.url, headers=_h(), timeout=10) as c:  # under the limit: served
            r = c.post(path, json={"user_ids": ["u1", "u2"]})
            assert r.status_code == 200 and len(r.json()["results"]) == 2


def test_authentication_comes_before_the_body_is_parsed(limited):
    with TestClient(create_app(limited)) as c:
        url = "/v1/tenants/acme/recommendations/batch"
        garbage = b"{not json" * 10_000
        assert c.post(url, content=garbage).status_code == 401
        assert c.post(url, content=garbage, headers={"X-API-Key": "wrong"}).status_code == 403
        assert c.post(url, content=garbage, headers=_h("noisy")).status_code == 403  # another tenant's key
        huge = {"user_ids": ["u1"] * 5000, "options": {"k": 100}}  # over every limit, bad key: still 403
        assert c.post(url, json=huge, headers={"X-API-Key": "wrong"}).status_code == 403
        assert c.post(url, content=garbage, headers=_h()).status_code in (400, 422)  # right key: now parsed


def test_batch_k_pool_and_events_are_bounded_and_documented(limited):
    with TestClient(create_app(limited)) as c:
        url = "/v1/tenants/acme/recommendations/batch"
        ok = c.post(url, json={"user_ids": [f"u{i}" for i in range(200)], "options": {"k": 100}}, headers=_h())
        assert ok.status_code == 200
        over = c.post(url, json={"user_ids": ["u1"] * 1001}, headers=_h())
        assert over.status_code == 422 and "1000" in over.text
        pool = c.post(url, json={"user_ids": ["u1"] * 1000, "options": {"k": 30, "diversity": 0.5}}, headers=_h())
        assert pool.status_code == 422 and "100000" in pool.text and "candidates" in pool.text
        assert c.get("/v1/tenants/acme/users/u1/recommendations?k=101", headers=_h()).status_code == 422
        events = [{"user_id": "u1", "item_id": "i1"}] * 1001
        assert c.post("/v1/tenants/acme/events", json={"events": events}, headers=_h()).status_code == 422
        schemas = c.get("/openapi.json").json()["components"]["schemas"]
        assert schemas["BatchRequest"]["properties"]["user_ids"]["maxItems"] == 1000
        assert schemas["EventsRequest"]["properties"]["events"]["maxItems"] == 1000
        assert schemas["Options"]["properties"]["k"]["maximum"] == 100
        assert "100,000 users x candidates" in schemas["BatchRequest"]["description"]


# ------------------------------------------------------------------ admission control


def _timed(client: httpx.Client, url: str, **kw) -> tuple[int, float, str | None]:
    started = time.perf_counter()
    r = client.get(url, **kw) if "json" not in kw else client.post(url, **kw)
    return r.status_code, time.perf_counter() - started, r.headers.get("retry-after")


def test_overload_sheds_fast_with_retry_after_and_admitted_requests_succeed(limited):
    """Capacity 2 (+2 queued for 20 ms), each request held 100 ms: capacity ~20 req/s, offered
    ~60 req/s for 2 s. Every answer is a 200 or a fast 503 with Retry-After; nothing times out."""
    settings = limited.model_copy(update={"max_concurrency": 2, "admission_queue": 2, "admission_wait_ms": 20.0})
    with Server(settings) as server:
        app = server.server.config.app

        async def slow_live(request: Request, tenant: Annotated[str, Depends(deps.authorize)]) -> LiveRelease:
            live = await deps.live_release(request, tenant)
            await asyncio.sleep(0.1)  # a request that holds its admission slot for 100 ms
            return live

        app.dependency_overrides[deps.live_release] = slow_live
        url = "/v1/tenants/acme/users/u1/recommendations"
        with httpx.Client(base_url=server.url, headers=_h(), timeout=10) as client:
            assert client.get(url).status_code == 200

            def at(t0: float) -> tuple[int, float, str | None]:
                time.sleep(max(0.0, t0 - time.perf_counter()))
                return _timed(client, url)

            start = time.perf_counter() + 0.05
            with ThreadPoolExecutor(32) as pool:
                outcomes = list(pool.map(at, [start + i / 60 for i in range(120)]))
        metrics = httpx.get(f"{server.url}/metrics").text
    statuses = [o[0] for o in outcomes]
    ok = sorted(o[1] for o in outcomes if o[0] == 200)
    shed = sorted(o[1] for o in outcomes if o[0] == 503)
    assert set(statuses) <= {200, 503}, statuses
    assert len(ok) >= 20 and len(shed) >= 30, (len(ok), len(shed))
    assert all(o[2] == "1" for o in outcomes if o[0] == 503)  # Retry-After on every 503
    assert shed[int(len(shed) * 0.99) - 1] < 0.5  # shed fast (the 100 ms hold is never waited out)
    assert ok[int(len(ok) * 0.99) - 1] < 2.0  # admitted ones keep a bounded latency
    assert 'recsys_shed_total{reason="queue_full"}' in metrics or 'reason="queue_timeout"' in metrics


class UvicornProcess:
    """The API in a uvicorn subprocess of our own (its own GIL: the test's client threads do not
    slow it down), configured through the environment like a deployment."""

    def __init__(self, settings, **env: str) -> None:
        self.port = _free_port()
        self.env = {
            **os.environ,
            "RECSYS_HOME": str(settings.home),
            "RECSYS_ARTIFACT_ROOT": settings.artifact_root,
            "RECSYS_TENANTS_DIR": str(settings.tenants_dir),
            "RECSYS_API_KEYS_FILE": str(settings.api_keys_file or ""),
            "RECSYS_AUTH_DISABLED": "1" if settings.auth_disabled else "0",
            "RECSYS_RATE_LIMIT": settings.rate_limit,
            "RECSYS_RELEASE_POLL_SECONDS": str(settings.release_poll_seconds),
            "PYTHONPATH": str(ROOT),
            **env,
        }
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> UvicornProcess:
        cmd = [sys.executable, "-m", "uvicorn", "--factory", "pipeline.serving.app:create_app"]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"]
        self.proc = subprocess.Popen(cmd, env=self.env, cwd=ROOT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"uvicorn exited with {self.proc.returncode}")
            time.sleep(0.1)
        self.__exit__()
        raise RuntimeError("uvicorn did not start")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def test_a_noisy_tenant_is_throttled_by_work_and_a_quiet_one_keeps_its_latency(limited):
    """noisy floods batches of 100 users x k=10 (1,000 units each) from 2 connections against a
    2,000 units/s budget: it gets 429 with Retry-After; acme's single requests keep their p99
    (within 2x of solo, with a 50 ms floor: the box is shared)."""
    quiet_url = "/v1/tenants/acme/users/u{}/recommendations"
    with UvicornProcess(limited, RECSYS_TENANT_WORK_LIMIT="2000/second") as server:

        def quiet(n: int) -> list[float]:
            with httpx.Client(base_url=server.url, headers=_h(), timeout=10) as c:
                out = []
                for i in range(n):
                    status, took, _ = _timed(c, quiet_url.format(i % N_USERS))
                    assert status == 200
                    out.append(took)
                    time.sleep(0.01)
                return sorted(out)

        quiet(20)  # warm up (the release loads on the first request)
        solo = quiet(100)
        stop = threading.Event()
        noisy_statuses: list[tuple[int, str | None]] = []

        def flood() -> None:
            body = {"user_ids": [f"u{i}" for i in range(100)], "options": {"k": 10}}
            with httpx.Client(base_url=server.url, headers=_h("noisy"), timeout=10) as c:
                while not stop.is_set():
                    r = c.post("/v1/tenants/noisy/recommendations/batch", json=body)
                    noisy_statuses.append((r.status_code, r.headers.get("retry-after")))

        floods = [threading.Thread(target=flood) for _ in range(2)]
        for t in floods:
            t.start()
        try:
            time.sleep(0.2)
            during = quiet(100)
        finally:
            stop.set()
            for t in floods:
                t.join(10)
        metrics = httpx.get(f"{server.url}/metrics").text
    p99 = lambda lat: lat[int(len(lat) * 0.99) - 1]  # noqa: E731
    codes = [s for s, _ in noisy_statuses]
    assert codes.count(429) > codes.count(200) > 0, codes
    assert all(r is not None for s, r in noisy_statuses if s == 429)
    assert 'recsys_work_quota_exceeded_total{tenant="noisy"}' in metrics
    assert 'recsys_work_quota_exceeded_total{tenant="acme"}' not in metrics
    # within 2x of solo; a floor of 50 ms keeps a loaded box's jitter from failing a 3 ms p99
    assert p99(during) <= 2 * max(p99(solo), 0.05), (p99(solo), p99(during), codes.count(200), codes.count(429))


# ------------------------------------------------------------------ precomputed candidates


def test_precomputed_candidates_answer_as_the_live_search(limited, tmp_path, mlflow_uri):
    """The same release with and without candidates.npy: identical answers, with filters and
    exclusions, for re-ranking pools wider than the list, and after a fold-in (live search)."""
    settings = limited.model_copy(update={"auth_disabled": True})
    plain = isolated_settings(tmp_path, mlflow_uri, rate_limit="")
    manifest = {"run_id": "20260101T000000Z", "data_interval_end": INTERVAL_END}
    release.publish_release(open_store(plain.artifact_root), "acme", _files(with_candidates=False), manifest)
    with TestClient(create_app(settings)) as fast, TestClient(create_app(plain)) as live:
        queries = [
            ("/v1/tenants/acme/users/u{}/recommendations", {"k": 10}),
            ("/v1/tenants/acme/users/u{}/recommendations", {"k": 10, "exclude": ["i1", "i2", "i3"]}),
            ("/v1/tenants/acme/users/u{}/recommendations", {"k": 5, "diversity": 0.3}),  # pool 50 > 20: live
        ]
        for path, params in queries:
            for u in range(0, N_USERS, 7):
                a = fast.get(path.format(u), params=params).json()
                b = live.get(path.format(u), params=params).json()
                assert [i["item_id"] for i in a["items"]] == [i["item_id"] for i in b["items"]], (u, params)
                assert np.allclose([i["score"] for i in a["items"]], [i["score"] for i in b["items"]], atol=1e-5)
        batch = {"user_ids": [f"u{u}" for u in range(40)], "options": {"k": 8}}
        a = fast.post("/v1/tenants/acme/recommendations/batch", json=batch).json()["results"]
        b = live.post("/v1/tenants/acme/recommendations/batch", json=batch).json()["results"]
        assert [[i["item_id"] for i in r["items"]] for r in a] == [[i["item_id"] for i in r["items"]] for r in b]
        before = [i["item_id"] for i in fast.get("/v1/tenants/acme/users/u5/recommendations").json()["items"]]
        event = {"events": [{"user_id": "u5", "item_id": before[0]}]}
        assert fast.post("/v1/tenants/acme/events", json=event).json()["users_folded_in"] == 1
        after = [i["item_id"] for i in fast.get("/v1/tenants/acme/users/u5/recommendations").json()["items"]]
        assert before[0] not in after  # folded in: the stale list is not used, the new seen item is excluded
        used = {
            name: {
                source: _counter(c.get("/metrics").text, "recsys_candidate_source_total", source)
                for source in ("precomputed", "search")
            }
            for name, c in (("fast", fast), ("live", live))
        }
    n = len(range(0, N_USERS, 7))
    # plain and excluded requests and the batch from the list; the wide pool and the folded-in user searched
    assert used["fast"] == {"precomputed": 2 * n + 40 + 1, "search": n + 1}, used
    assert used["live"] == {"precomputed": 0, "search": 3 * n + 40}, used


def test_precomputed_neighbors_answer_as_the_live_search(limited, tmp_path, mlflow_uri):
    """Similar items with and without neighbors.npy: identical items and scores, with filters,
    exclusions and pools wider than the list (the live search answers those)."""
    settings = limited.model_copy(update={"auth_disabled": True})
    plain = isolated_settings(tmp_path, mlflow_uri, rate_limit="")
    manifest = {"run_id": "20260101T000000Z", "data_interval_end": INTERVAL_END}
    release.publish_release(open_store(plain.artifact_root), "acme", _files(with_candidates=False), manifest)
    queries = [{"k": 10}, {"k": 10, "exclude": ["i1", "i2", "i3"]}, {"k": 20}, {"k": 5, "diversity": 0.3}]
    items = range(0, N_ITEMS, 9)
    with TestClient(create_app(settings)) as fast, TestClient(create_app(plain)) as live:
        for params in queries:
            for i in items:
                a = fast.get(f"/v1/tenants/acme/items/i{i}/similar", params=params).json()
                b = live.get(f"/v1/tenants/acme/items/i{i}/similar", params=params).json()
                assert [x["item_id"] for x in a["items"]] == [x["item_id"] for x in b["items"]], (i, params)
                assert np.allclose([x["score"] for x in a["items"]], [x["score"] for x in b["items"]], atol=1e-5)
                assert f"i{i}" not in {x["item_id"] for x in a["items"]}
                assert len(a["items"]) == params["k"]
        used = {
            name: {
                s: _counter(c.get("/metrics").text, "recsys_similar_source_total", s) for s in ("precomputed", "search")
            }
            for name, c in (("fast", fast), ("live", live))
        }
    n = len(items)
    # k=10, k=10 with exclusions and k=20 (the whole list of 20: no exclusion) from the list; diversity's pool searched
    assert used["fast"] == {"precomputed": 3 * n, "search": n}, used
    assert used["live"] == {"precomputed": 0, "search": 4 * n}, used


def _counter(text: str, name: str, source: str) -> float:
    lines = [ln for ln in text.splitlines() if ln.startswith(name + "{") and f'source="{source}"' in ln]
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines)
