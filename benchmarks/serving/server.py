"""The server under test: real uvicorn workers in their own process group, and how to wait for them."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

from benchmarks.serving import ROOT, TENANT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, headers: dict | None = None, timeout: float = 2.0) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class Server:
    def __init__(self, env: dict[str, str], workers: int, log_path: Path, access_log: bool, nice: int = 0) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        cmd = [
            sys.executable, "-m", "uvicorn", "--factory", "pipeline.serving.app:create_app",
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", str(workers),
            "--log-level", "warning",
        ]  # fmt: skip
        if not access_log:
            cmd.append("--no-access-log")
        self.cmd = cmd
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=(lambda: os.setpriority(os.PRIO_PROCESS, 0, nice)) if nice else None,
        )

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"uvicorn exited with {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(OSError):
                status, _ = http_get(self.base + "/readyz", timeout=1.0)
                if status == 200:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"uvicorn not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 4000) -> str:
        self._log.flush()
        return self.log_path.read_bytes()[-n:].decode(errors="replace")

    def pids(self) -> list[int]:
        try:
            import psutil

            parent = psutil.Process(self.proc.pid)
            return [parent.pid] + [c.pid for c in parent.children(recursive=True)]
        except Exception:
            return [self.proc.pid]

    def cpu_seconds(self) -> float | None:
        """user+system CPU of the uvicorn supervisor and its workers (psutil), or None."""
        try:
            import psutil

            total = 0.0
            for pid in self.pids():
                with contextlib.suppress(psutil.NoSuchProcess):
                    t = psutil.Process(pid).cpu_times()
                    total += t.user + t.system
            return total
        except ImportError:
            return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)  # our own session: uvicorn and its workers
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        self._log.close()


def start_server(
    env: dict,
    workers: int,
    log_path: Path,
    access_log: bool,
    api_key: str,
    nice: int = 0,
    attempts: int = 3,
    tenant: str = TENANT,
    probe_user: str = "u0",
) -> Server:
    """Start uvicorn and check one authorized request for `probe_user`, a user the release knows;
    retry (a half-saved edit can break an import)."""
    for attempt in range(1, attempts + 1):
        server = Server(env, workers, log_path, access_log, nice)
        try:
            server.wait_ready(timeout=90)
            check_auth(server, api_key, tenant, probe_user)
            return server
        except RuntimeError as exc:
            server.stop()
            if attempt == attempts:
                raise
            print(f"server did not start (attempt {attempt}): {str(exc)[-500:]}\nretrying in 30s", flush=True)
            time.sleep(30)
    raise AssertionError("unreachable")


def check_auth(server: Server, api_key: str, tenant: str = TENANT, user: str = "u0") -> None:
    url = f"{server.base}/v1/tenants/{tenant}/users/{quote(user, safe='')}/recommendations?k=10"
    status, _ = http_get(url, timeout=30)
    if status != 401:
        raise RuntimeError(f"expected 401 without a key, got {status}")
    deadline = time.monotonic() + 30
    while True:  # the first request of each worker loads the release (a few seconds)
        status, body = http_get(url, {"X-API-Key": api_key}, timeout=60)
        if status == 200:
            doc = json.loads(body)
            if len(doc.get("items", [])) != 10 or doc.get("fallback"):
                raise RuntimeError(f"unexpected response: {doc}")
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"GET {url} -> {status}: {body[:500]!r}\n{server.log_tail()}")
        time.sleep(0.5)


def settle(server: Server, max_s: float = 30.0) -> None:
    """After an overload, wait until the server answers /healthz quickly again (queues drained)."""
    deadline = time.monotonic() + max_s
    time.sleep(1.0)
    while time.monotonic() < deadline:
        t = time.perf_counter()
        with contextlib.suppress(OSError):
            http_get(server.base + "/healthz", timeout=5.0)
        if time.perf_counter() - t < 0.01:
            return
        time.sleep(0.5)
