"""A real `airflow standalone`, started by include/scripts/airflow_standalone.sh (what `make
airflow` runs) on a free port with a throwaway AIRFLOW_HOME on SQLite. Shared by the start-up
test and the browser journey test."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.dags.conftest import ROOT

SCRIPT = ROOT / "include" / "scripts" / "airflow_standalone.sh"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Standalone:
    url: str
    home: Path
    log: Path
    process: subprocess.Popen

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def password(self, user: str = "admin") -> str:
        return json.loads((self.home / "simple_auth_manager_passwords.json.generated").read_text())[user]

    def token(self, user: str = "admin") -> str:
        r = httpx.post(f"{self.url}/auth/token", json={"username": user, "password": self.password(user)}, timeout=30)
        r.raise_for_status()
        return r.json()["access_token"]

    def wait_for(self, what: str, check, timeout: float = 240.0, every: float = 2.0):
        """Poll `check()` until it returns something truthy; fail with the server's log tail."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"airflow standalone exited ({self.process.returncode}):\n{self.output()[-4000:]}")
            try:
                if out := check():
                    return out
            except (httpx.HTTPError, OSError, KeyError, ValueError):
                pass
            time.sleep(every)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}:\n{self.output()[-4000:]}")


@contextmanager
def standalone(base: Path, env: dict[str, str] | None = None) -> Iterator[Standalone]:
    """Start the script (no `make`: the venv is the running interpreter's), wait until the API
    answers and the admin password exists; stop the whole process group afterwards."""
    port = free_port()
    home = base / "airflow-standalone"
    home.mkdir(parents=True, exist_ok=True)
    log = base / "standalone.log"
    full_env = {
        **os.environ,
        "VENV": str(Path(sys.executable).parent.parent),
        "AIRFLOW_HOME": str(home),
        "AIRFLOW_HOST": "127.0.0.1",
        "AIRFLOW_PORT": str(port),
        "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        **(env or {}),
    }
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(SCRIPT)], env=full_env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
        )
    server = Standalone(f"http://127.0.0.1:{port}", home, log, proc)
    try:
        server.wait_for(
            "the API server",
            lambda: httpx.get(f"{server.url}/api/v2/monitor/health", timeout=5).status_code == 200,
        )
        server.wait_for("the admin password", lambda: server.password())
        yield server
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
