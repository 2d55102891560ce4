"""A real uvicorn server over a real release: release swaps under load, and schemathesis
against the published OpenAPI document."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest

from pipeline.context import RunContext
from pipeline.index import build as index
from pipeline.index import search as ann
from pipeline.release import format as release
from pipeline.release import refresh
from pipeline.samples import synthetic
from pipeline.serving.app import create_app
from pipeline.serving.auth import hash_key
from pipeline.stages import run_all
from pipeline.storage import open_store
from tests.conftest import INTERVAL_END, REDIS_URL, isolated_settings, write_tenant

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn in a thread (the real HTTP stack, no test transport)."""

    def __init__(self, settings) -> None:
        import uvicorn

        self.port = _free_port()
        config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def two_releases(tmp_path_factory, mlflow_uri):
    """Tenant acme published (release A), plus release B: the same users with other item vectors."""
    root = tmp_path_factory.mktemp("server")
    settings = isolated_settings(root, mlflow_uri, release_poll_seconds=0, rate_limit="")
    cfg = write_tenant(settings, "acme", synthetic.interactions(n_users=200, n_items=120, mean_events=18, seed=1))
    results = run_all(RunContext(config=cfg, interval_end=INTERVAL_END, settings=settings))
    store = open_store(settings.artifact_root)
    a = release.load_release(store, "acme", results["publish"]["release_id"])
    other = np.roll(a.item_vectors, 17, axis=0) * np.float32(1.5)
    files = release.files_from_vectors(
        a.user_ids,
        a.item_ids,
        a.user_vectors,
        other,
        a.seen_indptr,
        a.seen_indices,
        index_bytes=ann.serialize(index.build_index(other)[0]),
        model_meta=a.model_meta,
        popular_items=len(a.popular),
    )
    b_id = release.release_id_for("20250402T000000Z", files)
    manifest = {"run_id": "20250402T000000Z", "data_interval_end": "2025-04-02T00:00:00+00:00"}
    release.write_release(store, "acme", b_id, files, manifest)  # not flipped: the test flips Redis
    b = release.load_release(store, "acme", b_id)
    return settings, a, b


def _expected(rel: release.Release, users: list[int], k: int = 10) -> dict[str, list[str]]:
    scores = rel.user_vectors[users] @ rel.item_vectors.T
    out = {}
    for n, u in enumerate(users):
        s = scores[n].copy()
        s[rel.seen(u)] = -np.inf
        out[rel.user_ids[u]] = list(rel.item_ids[np.argsort(-s, kind="stable")[:k]])
    return out


@pytest.mark.slow
def test_release_swaps_under_load_never_error_or_mix(two_releases, redis_prefix):
    """>= 5,000 requests while the Redis pointer flips A <-> B every few ms: 0 errors, 0 mixed."""
    import httpx
    import redis

    settings, a, b = two_releases
    r = redis.Redis.from_url(REDIS_URL)
    for rel in (a, b):
        refresh.write_release(r, redis_prefix, rel)
    refresh.flip(r, redis_prefix, "acme", a.release_id, grace_seconds=3600)
    users = list(range(0, 200, 5))
    expected = {a.release_id: _expected(a, users), b.release_id: _expected(b, users)}
    assert expected[a.release_id] != expected[b.release_id]
    live = settings.model_copy(update={"redis_url": REDIS_URL, "redis_prefix": redis_prefix})
    stop = threading.Event()
    flips = []

    def flipper():
        ids = [a.release_id, b.release_id]
        while not stop.is_set():
            target = ids[len(flips) % 2]
            refresh.flip(r, redis_prefix, "acme", target, grace_seconds=-1)  # -1: keep both, no expiry scan
            flips.append(target)
            time.sleep(0.005)

    def worker(n_requests: int, seed: int) -> tuple[int, int, dict[str, int]]:
        rng = np.random.default_rng(seed)
        errors = mixed = 0
        seen_releases: dict[str, int] = {}
        with httpx.Client(base_url=server.url, timeout=10) as client:
            for _ in range(n_requests):
                uid = a.user_ids[users[rng.integers(len(users))]]
                resp = client.get(f"/v1/tenants/acme/users/{uid}/recommendations", params={"k": 10})
                if resp.status_code != 200:
                    errors += 1
                    continue
                body = resp.json()
                rid = body["release_id"]
                seen_releases[rid] = seen_releases.get(rid, 0) + 1
                if [i["item_id"] for i in body["items"]] != expected[rid][uid]:
                    mixed += 1
        return errors, mixed, seen_releases

    with Server(live) as server:
        flip_thread = threading.Thread(target=flipper, daemon=True)
        flip_thread.start()
        try:
            with ThreadPoolExecutor(8) as pool:
                outcomes = list(pool.map(worker, [650] * 8, range(8)))
        finally:
            stop.set()
            flip_thread.join(5)
    errors = sum(o[0] for o in outcomes)
    mixed = sum(o[1] for o in outcomes)
    served = pd.DataFrame([o[2] for o in outcomes]).sum()
    assert errors == 0 and mixed == 0
    assert served.sum() == 5200 and set(served.index) == {a.release_id, b.release_id}  # both served
    assert len(flips) >= 10


def test_openapi_contract_with_schemathesis(two_releases):
    """Every operation, fuzzed from the OpenAPI document with auth ON (the key is the document's
    `APIKeyHeader` security scheme, so the fuzzer sends it): no 5xx, every answer as documented,
    every answer within 2 s (schemathesis's max_response_time check)."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.config import SchemathesisConfig

    base_settings, a, _ = two_releases
    keys_file = base_settings.home.parent / "schemathesis-keys.yaml"
    keys_file.write_text(f"acme: [{hash_key('acme-secret')}]\n")
    auth_on = base_settings.model_copy(update={"auth_disabled": False, "api_keys_file": keys_file})
    config = SchemathesisConfig.from_dict(
        {"auth": {"openapi": {"APIKeyHeader": {"api_key": "acme-secret"}}}, "checks": {"max_response_time": 2.0}}
    )
    with Server(auth_on) as server:
        schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json", config=config)
        document = schema.raw_schema
        assert document["components"]["securitySchemes"]["APIKeyHeader"] == {
            "type": "apiKey", "in": "header", "name": "X-API-Key", "description": "The tenant's API key."
        }  # fmt: skip
        failures: list[str] = []
        statuses: dict[int, int] = {}
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 7

        def fuzz(operation, mode, pin_tenant: bool) -> None:
            pinned = (
                {"tenant": "acme"} if pin_tenant and "{tenant}" in operation.path else None
            )  # reach past the 404 of unknown tenants

            @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            @given(case=operation.as_strategy(mode, path_parameters=pinned))
            def check(case):
                response = case.call_and_validate(base_url=server.url)
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

            try:
                check()
            except Exception as exc:  # collect every operation's failure, report together
                failures.append(f"{operation.label} ({mode.value}, tenant pinned: {pin_tenant}): {exc}")

        for operation in operations:
            if "{tenant}" not in operation.path:  # /healthz, /readyz: nothing to make invalid
                fuzz(operation, schemathesis.GenerationMode.POSITIVE, pin_tenant=False)
                continue
            for mode in schemathesis.GenerationMode:
                fuzz(operation, mode, pin_tenant=False)
                fuzz(operation, mode, pin_tenant=True)
        assert not failures, "\n\n".join(failures[:5])
        assert statuses.get(200, 0) + statuses.get(202, 0) > 50 and statuses.get(422, 0) > 0, statuses
