"""Serving under dependency faults, with processes these tests own: a redis-server SIGKILLed
under load and restarted empty, a paused Redis (CLIENT PAUSE), a stopped S3 (moto's
server), a tenant whose store reads hang, a corrupt release. Every answer is 200 with k
items (degraded where Redis is missing), or 503 with Retry-After for a tenant that never
loaded; nothing waits on another tenant's load; a bad release is refused once, not every poll.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from pipeline.release import format as rel
from pipeline.release import refresh
from pipeline.serving import app as serving_app
from pipeline.serving.app import create_app
from pipeline.serving.breaker import CLOSED, HALF_OPEN, OPEN, Breaker
from pipeline.storage import LocalStore, paths
from tests.conftest import isolated_settings
from tests.integration.test_release_safety import make_files as release_files

pytestmark = pytest.mark.integration

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
ADMIN = {"Authorization": "Bearer admin-secret"}
K = 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisProc:
    """A redis-server of our own (no persistence): killed, paused and restarted by the tests only."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisProc:
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--save", "", "--appendonly", "no", "--bind", "127.0.0.1"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        import redis

        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis(port=self.port, socket_timeout=0.2).ping()
                return self
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def client(self):
        import redis

        return redis.Redis(port=self.port)


@pytest.fixture
def own_redis():
    r = RedisProc().start()
    yield r
    r.kill()


def make_files(seed: int) -> dict[str, bytes]:
    """A small dot-product release whose model is ALS, so posted events fold in."""
    meta = {"kind": "als", "config": {"kind": "als", "factors": 8}, "seed": seed}
    return release_files(seed, 60, 40, 8, seen=(1, 4), model_meta=meta, popular_items=20)


def publish(store, tenant: str, seed: int, day: int = 1) -> str:
    manifest = {"run_id": f"run-{seed}", "data_interval_end": f"2025-04-{day:02d}T00:00:00+00:00"}
    return rel.publish_release(store, tenant, make_files(seed), manifest, retries=0).release_id


def to_redis(r, prefix: str, store, tenant: str, rid: str) -> None:
    refresh.write_release(r, prefix, rel.load_release(store, tenant, rid))
    assert refresh.flip(r, prefix, tenant, rid, grace_seconds=600)[0]


def p99(latencies: list[float]) -> float:
    return float(np.percentile(latencies, 99)) if latencies else 0.0


def fault_settings(tmp_path: Path, mlflow_uri: str, **overrides):
    values = {
        "release_poll_seconds": 0.1,
        "rate_limit": "100000/second",
        "breaker_failures": 3,
        "breaker_reset_seconds": 0.5,
        "cold_wait_seconds": 0.5,
        "admin_token": "admin-secret",
    }
    return isolated_settings(tmp_path, mlflow_uri, **{**values, **overrides})


# --------------------------------------------------------------------------- the breaker alone


def test_breaker_opens_probes_once_and_closes():
    now = [0.0]
    states: list[int] = []
    b = Breaker("dep", failures=2, reset_seconds=1.0, clock=lambda: now[0], on_state=lambda _, s: states.append(s))
    assert b.allow()
    b.failure()
    assert b.state == CLOSED and b.allow()
    b.failure()
    assert b.state == OPEN and b.is_open and not b.allow()
    now[0] = 1.5  # cool-down over: one probe, the others still skip
    assert not b.is_open and b.allow() and b.state == HALF_OPEN and not b.allow()
    b.failure()  # the probe failed: open again for a full cool-down
    assert b.state == OPEN and not b.allow()
    now[0] = 3.0
    assert b.allow()
    b.success()
    assert b.state == CLOSED and b.allow()
    assert states == [CLOSED, OPEN, HALF_OPEN, OPEN, HALF_OPEN, CLOSED]


# --------------------------------------------------------------------------- Redis SIGKILLed, restarted empty


class Uvicorn:
    """`uvicorn --factory pipeline.serving.app:create_app` as a child process, settings from env."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.log = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "pipeline.serving.app:create_app", "--host", "127.0.0.1",
             "--port", str(self.port), "--log-level", "warning"],
            env={**os.environ, **env},
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 30) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "uvicorn exited"
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError("uvicorn never became ready")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def _load(url: str, users: list[str], stop: threading.Event, out: list, threads: int = 4) -> ThreadPoolExecutor:
    """Requests from `threads` clients until `stop`: (sent_at, status, seconds, body or None)."""
    import httpx

    def worker(n: int) -> None:
        with httpx.Client(timeout=5) as c:
            i = n
            while not stop.is_set():
                i += threads
                user = users[i % len(users)]
                t0 = time.perf_counter()
                r = c.get(f"{url}/v1/tenants/acme/users/{user}/recommendations", params={"k": K})
                took = time.perf_counter() - t0
                out.append((time.monotonic(), r.status_code, took, r.json() if r.status_code == 200 else r.text))

    pool = ThreadPoolExecutor(threads)
    for n in range(threads):
        pool.submit(worker, n)
    return pool


def test_redis_sigkilled_under_load_then_restarted_empty(tmp_path, mlflow_uri, own_redis):
    import httpx

    store = LocalStore(tmp_path / "artifacts")
    rid = publish(store, "acme", seed=1)
    prefix = "faults"
    to_redis(own_redis.client(), prefix, store, "acme", rid)
    env = {
        "RECSYS_ARTIFACT_ROOT": str(tmp_path / "artifacts"),
        "RECSYS_TENANTS_DIR": str(tmp_path),
        "RECSYS_REDIS_URL": own_redis.url,
        "RECSYS_REDIS_PREFIX": prefix,
        "RECSYS_AUTH_DISABLED": "1",
        "RECSYS_RATE_LIMIT": "100000/second",
        "RECSYS_RELEASE_POLL_SECONDS": "0.2",
        "RECSYS_BREAKER_FAILURES": "3",
        "RECSYS_BREAKER_RESET_SECONDS": "0.5",
        "RECSYS_SERVING_TENANTS": "acme",
        "RECSYS_ADMIN_TOKEN": "admin-secret",
    }
    server = Uvicorn(env, tmp_path / "uvicorn.log")
    out: list = []
    stop = threading.Event()
    try:
        server.wait_ready()
        users = [f"u{i}" for i in range(60)]
        pool = _load(server.url, users, stop, out)
        time.sleep(1.0)
        killed_at = time.monotonic()
        own_redis.kill()
        time.sleep(1.5)
        # while Redis is dead: events are logged, not folded in; batch and rank answer degraded
        with httpx.Client(base_url=server.url, timeout=5) as c:
            ev = c.post("/v1/tenants/acme/events", json={"events": [{"user_id": "u1", "item_id": "i3"}]})
            assert ev.status_code == 202 and ev.json()["degraded"] is True and ev.json()["users_folded_in"] == 0
            batch = c.post("/v1/tenants/acme/recommendations/batch", json={"user_ids": ["u1", "new"]})
            assert batch.status_code == 200 and batch.json()["degraded"] is True
            ranked = c.post("/v1/tenants/acme/users/u2/rank", json={"item_ids": ["i1", "i2"]})
            assert ranked.status_code == 200 and ranked.json()["degraded"] is True
            assert c.get("/metrics").status_code == 401
            text = c.get("/metrics", headers=ADMIN).text
            assert 'recsys_breaker_state{dependency="redis"} 2.0' in text
            assert 'recsys_degraded_total{reason="redis_breaker_open",tenant="acme"}' in text
        restarted_at = time.monotonic()
        own_redis.start()  # EMPTY: no pointer, no user keys
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            recent = [o for o in out[-12:] if o[0] > restarted_at + 0.1]
            if len(recent) >= 6 and all(o[1] == 200 and o[3]["degraded"] is False for o in recent):
                break
            time.sleep(0.1)
        stop.set()
        pool.shutdown(wait=True)
        readyz = httpx.get(server.url + "/readyz").json()
        assert readyz == {"status": "ok", "loaded": 1, "expected": 1, "tenants": None}
        assert httpx.get(server.url + "/readyz", headers=ADMIN).json()["tenants"] == {"acme": rid}
    finally:
        stop.set()
        server.stop()
    assert out, "no requests were made"
    bad = [o for o in out if o[1] != 200 or len(o[3]["items"]) != K]
    assert not bad, bad[:3]
    assert all(o[3]["release_id"] == rid for o in out)
    during = [o for o in out if killed_at + 0.2 < o[0] - o[2] and o[0] < restarted_at]
    after_kill = [o for o in out if o[0] - o[2] > killed_at]
    assert during and all(o[3]["degraded"] for o in during)
    assert all(o[3]["fallback"] is False for o in during)  # the release holds these users: still personal
    # generous: a 2-core box shared with other test runs stalls every process for 0.1-0.5 s at times
    assert p99([o[2] for o in after_kill]) < 1.0, p99([o[2] for o in after_kill])
    final = out[-6:]
    assert all(o[3]["degraded"] is False for o in final), final  # recovered, no restart
    before = p99([o[2] for o in out if o[0] < killed_at]) * 1e3
    print(
        f"\nredis SIGKILL: {len(out)} requests, 0 errors; p99 before {before:.1f} ms, "
        f"after kill {p99([o[2] for o in after_kill]) * 1e3:.1f} ms (degraded {len(during)})"
    )


# --------------------------------------------------------------------------- Redis paused (CLIENT PAUSE)


def test_paused_redis_answers_degraded_within_bounded_latency(tmp_path, mlflow_uri, own_redis):
    store = LocalStore(tmp_path / "artifacts")
    rid = publish(store, "acme", seed=2)
    prefix = "paused"
    to_redis(own_redis.client(), prefix, store, "acme", rid)
    settings = fault_settings(tmp_path, mlflow_uri, redis_url=own_redis.url, redis_prefix=prefix)
    with TestClient(create_app(settings)) as c:
        url = "/v1/tenants/acme/users/u{}/recommendations"
        assert c.get(url.format(1), params={"k": K}).json()["degraded"] is False
        own_redis.client().execute_command("CLIENT", "PAUSE", "2500", "ALL")
        paused_at = time.monotonic()

        def one(i: int) -> tuple[float, int, dict]:
            t0 = time.perf_counter()
            r = c.get(url.format(i % 60), params={"k": K})
            return time.perf_counter() - t0, r.status_code, r.json()

        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(one, range(60)))
        assert time.monotonic() - paused_at < 2.5, "the requests must finish while Redis is still paused"
        assert all(status == 200 and len(body["items"]) == K and body["degraded"] for _, status, body in got)
        latency = p99([t for t, _, _ in got])
        assert latency < 1.0, latency  # each read waits at most 50 ms, then the breaker skips Redis
        deadline = time.monotonic() + 6  # the pause ends; after the cool-down a read probes and closes the breaker
        while c.get(url.format(1), params={"k": K}).json()["degraded"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert c.get(url.format(1), params={"k": K}).json()["degraded"] is False
    print(f"\nredis CLIENT PAUSE: {len(got)} requests, 0 errors, p99 {latency * 1e3:.1f} ms")


def test_cold_start_with_redis_down_serves_the_release_files_then_follows_redis(tmp_path, mlflow_uri, own_redis):
    from pipeline.serving.user_store import ResilientRedisStore

    store = LocalStore(tmp_path / "artifacts")
    rid = publish(store, "acme", seed=9)
    own_redis.kill()
    settings = fault_settings(tmp_path, mlflow_uri, redis_url=own_redis.url, redis_prefix="cold")
    url = "/v1/tenants/acme/users/u1/recommendations"
    with TestClient(create_app(settings)) as c:
        body = c.get(url, params={"k": K}).json()  # the artifact store's pointer, the release's own rows
        assert body["release_id"] == rid and body["degraded"] is True and body["fallback"] is False
        own_redis.start()
        to_redis(own_redis.client(), "cold", store, "acme", rid)
        deadline = time.monotonic() + 5  # (a poll between the restart and the flip sees an empty Redis)
        while not isinstance(c.app.state.releases.current("acme").users, ResilientRedisStore):
            assert time.monotonic() < deadline, "serving never followed Redis's pointer"
            time.sleep(0.05)
        assert c.get(url, params={"k": K}).json()["degraded"] is False


# --------------------------------------------------------------------------- a tenant whose store hangs


class HangingStore(LocalStore):
    """A local store whose reads of one tenant's keys wait on a gate (a stuck S3 connection)."""

    def __init__(self, root: Path, tenant: str) -> None:
        super().__init__(root)
        self.gate = threading.Event()
        self.hung = f"tenants/{tenant}/"
        self.hanging = False

    def get_with_etag(self, key: str):
        if self.hanging and key.startswith(self.hung):
            self.gate.wait(30)
        return super().get_with_etag(key)


def test_a_hanging_tenant_never_delays_another(tmp_path, mlflow_uri, monkeypatch):
    store = HangingStore(tmp_path / "artifacts", "slow")
    rid = publish(store, "acme", seed=3)
    slow_rid = publish(store, "slow", seed=4)
    store.hanging = True
    monkeypatch.setattr(serving_app, "open_store", lambda uri, s3_config=None: store)
    settings = fault_settings(tmp_path, mlflow_uri, serving_tenants="acme,slow", cold_wait_seconds=0.3)
    try:
        with TestClient(create_app(settings)) as c:
            deadline = time.monotonic() + 5
            while c.get("/readyz").json()["loaded"] < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            r = c.get("/readyz")
            assert r.status_code == 503 and r.json() == {
                "status": "loading",
                "loaded": 1,
                "expected": 2,
                "tenants": None,
            }
            assert "acme" not in r.text and rid not in r.text
            latencies = []
            for i in range(100):
                t0 = time.perf_counter()
                got = c.get(f"/v1/tenants/acme/users/u{i % 60}/recommendations", params={"k": K})
                latencies.append(time.perf_counter() - t0)
                assert got.status_code == 200 and got.json()["release_id"] == rid
            t0 = time.perf_counter()
            cold = c.get("/v1/tenants/slow/users/u1/recommendations")
            cold_s = time.perf_counter() - t0
            assert cold.status_code == 503 and int(cold.headers["Retry-After"]) >= 1
            assert 0.25 < cold_s < 2.0
            assert p99(latencies) < 0.5, p99(latencies)
            store.gate.set()
            deadline = time.monotonic() + 5
            while c.get("/readyz").status_code != 200 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert c.get("/readyz", headers=ADMIN).json()["tenants"] == {"acme": rid, "slow": slow_rid}
            assert c.get("/v1/tenants/slow/users/u1/recommendations").json()["release_id"] == slow_rid
            assert c.get("/v1/tenants/nobody/users/u1/recommendations").status_code == 404
    finally:
        store.gate.set()
    print(f"\nhanging tenant: healthy p99 {p99(latencies) * 1e3:.1f} ms; cold tenant 503 in {cold_s * 1e3:.0f} ms")


# --------------------------------------------------------------------------- S3 stopped


def test_s3_down_loaded_tenants_keep_serving_new_ones_get_503(tmp_path, mlflow_uri, monkeypatch):
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    stopped = False
    try:
        for k, v in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        }.items():
            monkeypatch.setenv(k, v)
        boto3.client("s3").create_bucket(Bucket="faults")
        from pipeline.storage.s3 import S3Store

        rid = publish(S3Store("s3://faults/root"), "acme", seed=5)
        settings = fault_settings(
            tmp_path,
            mlflow_uri,
            artifact_root="s3://faults/root",
            s3_connect_timeout_s=0.5,
            s3_read_timeout_s=0.5,
            serving_tenants="acme",
        )
        with TestClient(create_app(settings)) as c:
            deadline = time.monotonic() + 10
            while c.get("/readyz").status_code != 200 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert c.get("/v1/tenants/acme/users/u1/recommendations").status_code == 200
            moto.stop()
            stopped = True
            time.sleep(0.5)  # a few failed polls: the store's breaker opens
            latencies = []
            for i in range(60):
                t0 = time.perf_counter()
                got = c.get(f"/v1/tenants/acme/users/u{i}/recommendations", params={"k": K})
                latencies.append(time.perf_counter() - t0)
                assert got.status_code == 200 and got.json()["release_id"] == rid and len(got.json()["items"]) == K
            t0 = time.perf_counter()
            ghost = c.get("/v1/tenants/ghost/users/u1/recommendations")
            ghost_s = time.perf_counter() - t0
            assert ghost.status_code == 503 and int(ghost.headers["Retry-After"]) >= 1, ghost.text
            assert ghost_s < 2.0
            assert p99(latencies) < 0.5, p99(latencies)
            text = c.get("/metrics", headers=ADMIN).text
            assert 'recsys_breaker_state{dependency="object_store"}' in text
            assert 'recsys_unavailable_total{outcome="unreachable",tenant="ghost"} 1.0' in text
    finally:
        if not stopped:
            moto.stop()
    print(
        f"\nS3 stopped: loaded tenant p99 {p99(latencies) * 1e3:.1f} ms; "
        f"never-loaded tenant 503 in {ghost_s * 1e3:.0f} ms"
    )


# --------------------------------------------------------------------------- a corrupt release


class CountingStore(LocalStore):
    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.reads: list[str] = []

    def get(self, key: str) -> bytes:
        self.reads.append(key)
        return super().get(key)


def test_corrupt_release_is_refused_once_remembered_and_alerted(tmp_path, mlflow_uri, monkeypatch, caplog):
    store = CountingStore(tmp_path / "artifacts")
    a = publish(store, "acme", seed=6, day=1)
    monkeypatch.setattr(serving_app, "open_store", lambda uri, s3_config=None: store)
    settings = fault_settings(tmp_path, mlflow_uri, release_poll_seconds=0.05)
    url = "/v1/tenants/acme/users/u1/recommendations"
    with TestClient(create_app(settings)) as c, caplog.at_level(logging.ERROR, logger="pipeline.serving.releases"):
        assert c.get(url).json()["release_id"] == a
        files = make_files(7)
        b = rel.release_id_for("run-7", files)
        rel.write_release(
            store, "acme", b, files, {"run_id": "run-7", "data_interval_end": "2025-04-02T00:00:00+00:00"}
        )
        k = paths.release_key("acme", b, "item_vectors.npy")
        data = bytearray(store.get(k))
        data[len(data) // 2] ^= 1
        store.put(k, bytes(data))
        store.reads.clear()
        assert rel.flip_pointer(store, "acme", rel.Pointer(b, "2025-04-02T00:00:00+00:00")).moved
        time.sleep(0.6)  # about 12 polls
        assert c.get(url).json()["release_id"] == a  # A keeps serving
        manifest_reads = [r for r in store.reads if r == paths.release_key("acme", b, rel.MANIFEST)]
        assert len(manifest_reads) == 1, store.reads  # B was read once, not every poll
        text = c.get("/metrics", headers=ADMIN).text
        assert f'recsys_release_load_failures_total{{release_id="{b}",tenant="acme"}} 1.0' in text
        errors = [r.getMessage() for r in caplog.records if r.name == "pipeline.serving.releases"]
        assert len(errors) == 1 and "tenant acme" in errors[0] and f"cannot load release {b}" in errors[0]
        c3 = publish(store, "acme", seed=8, day=3)  # the pointer moves on: a good release is loaded
        deadline = time.monotonic() + 3
        while c.get(url).json()["release_id"] != c3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c.get(url).json()["release_id"] == c3
