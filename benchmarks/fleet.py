"""A real Airflow deployment on this machine, for the fleet benchmark and the slow fleet tests.

`Deployment` runs the components as separate processes (api-server, dag-processor, scheduler,
and for Celery two `airflow celery worker`s) under a throwaway AIRFLOW_HOME, on its own
PostgreSQL database (created and dropped here) — not `dags test`, so every task is a process
the executor starts, as in production. `make_tenants` writes N synthetic tenants (long-tailed
sizes) with their sources; `task_rows` reads each task instance's timestamps from the metadata
DB and the stage timings the task returned (its XCom: `task_timing`, written by
`pipeline.airflow_tasks.run_stage`), which `task_parts` splits into where the time went.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
AIRFLOW = str(Path(sys.executable).with_name("airflow"))
LOCAL_SETTINGS = ROOT / "include" / "airflow" / "config" / "airflow_local_settings.py"
PG = os.environ.get("RECSYS_FLEET_PG", "postgresql://postgres@127.0.0.1:5432")
OPEN_GATE = {  # every tenant publishes: all 11 tasks run (the worst case for task count)
    "require_beat_popularity": False,
    "tolerance": 1.0,
    "min_coverage_ratio": 0.0,
    "max_cold_recall_drop": 1.0,
    "max_long_tail_recall_drop": 1.0,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def last_tick(now: datetime, hour: int = 2) -> datetime:
    """The data interval end the scheduler's first run of a daily `0 {hour} * * *` DAG gets."""
    tick = now.replace(hour=hour, minute=0, second=0, microsecond=0)
    return tick if tick <= now else tick - timedelta(days=1)


def tenant_sizes(n: int, mean_events: float, seed: int = 0) -> list[int]:
    """Interactions per tenant: log-normal (a few large tenants, a long tail of small ones),
    rescaled so the mean is `mean_events`; at least 2,000 so every tenant can train."""
    raw = np.random.default_rng(seed).lognormal(0.0, 0.7, n)
    return [max(2_000, int(x)) for x in raw / raw.mean() * mean_events]


def make_tenants(
    base: Path, n: int, mean_events: float, interval_end: datetime, seed: int = 0, model: dict | None = None
) -> list[str]:
    """Write `n` tenant YAMLs under base/tenants and their CSV sources under base/sources."""
    from pipeline.samples import synthetic

    (base / "tenants").mkdir(parents=True, exist_ok=True)
    (base / "sources").mkdir(exist_ok=True)
    names = []
    start = (interval_end - timedelta(days=60)).strftime("%Y-%m-%d")
    for i, events in enumerate(tenant_sizes(n, mean_events, seed)):
        name = f"t{i:03d}"
        users = max(100, events // 20)
        items = max(50, int(users**0.8))
        df = synthetic.interactions(n_users=users, n_items=items, mean_events=20, seed=seed + i, start=start, days=59)
        df.to_csv(base / "sources" / f"{name}.csv", index=False)
        cfg = {
            "tenant": name,
            "source": {"uri": f"sources/{name}.csv", "columns": {"rating": "rating"}},
            "gate": OPEN_GATE,
            "validation": {"min_rows": 100},
            **({"model": model} if model else {}),
        }
        (base / "tenants" / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        names.append(name)
    return names


def _sql(url: str, query: str, *args: Any, autocommit: bool = False) -> list[tuple]:
    import psycopg

    with psycopg.connect(url, autocommit=autocommit) as conn:
        cur = conn.execute(query, args or None)
        return cur.fetchall() if cur.description else []


class MemorySampler:
    """Peak memory while a run lasts: the machine's used memory, and the summed PSS of this
    process's descendants (the deployment's own share on a shared box; PSS, not RSS, so pages
    that forked tasks share with their parent count once), sampled every second."""

    def __init__(self) -> None:
        self.peak_used = self.peak_tree = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.wait(1.0):
            self.peak_used = max(self.peak_used, psutil.virtual_memory().used)
            tree = 0
            for p in me.children(recursive=True):
                try:
                    tree += p.memory_full_info().pss
                except psutil.Error:
                    pass
            self.peak_tree = max(self.peak_tree, tree)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Deployment:
    """Airflow components as processes under `base`; its own database `name` on PostgreSQL."""

    base: Path
    name: str
    executor: str = "LocalExecutor"
    parallelism: int = 4
    training_slots: int = 2
    preload: bool = True  # install include/airflow/config/airflow_local_settings.py (pipeline/preload.py)
    extra_env: dict[str, str] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.port, self.log_port = free_port(), free_port()
        self.db_url = f"{PG}/{self.name}"

    @property
    def env(self) -> dict[str, str]:
        home = self.base / "airflow"
        env = {
            **os.environ,
            "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}".rstrip(os.pathsep),
            "PATH": f"{Path(AIRFLOW).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.base / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(self.base / "no-plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
            "AIRFLOW__CORE__EXECUTOR": self.executor,
            "AIRFLOW__CORE__PARALLELISM": str(self.parallelism),
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{self.port}/execution/",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.db_url.replace("postgresql://", "postgresql+psycopg://"),
            # psycopg 3 does async too (Airflow would otherwise derive asyncpg, not installed)
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC": self.db_url.replace(
                "postgresql://", "postgresql+psycopg_async://"
            ),
            "AIRFLOW__API_AUTH__JWT_SECRET": "fleet-benchmark-only",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__CORE__FERNET_KEY": "",
            "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home / "logs"),
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(self.log_port),  # not 8793: others may run Airflow
            "RECSYS_HOME": str(self.base / "home"),
            "RECSYS_TENANTS_DIR": str(self.base / "tenants"),
            "RECSYS_DATA_ROOT": str(self.base),
            "MLFLOW_TRACKING_URI": f"sqlite:///{self.base / 'mlflow.db'}",
            "GX_ANALYTICS_ENABLED": "false",
            "MLFLOW_ENABLE_ASYNC_LOGGING": "false",
            "PYTHONWARNINGS": "ignore",
        }
        env.pop("RECSYS_ARTIFACT_ROOT", None)
        env.pop("RECSYS_REDIS_URL", None)
        return {**env, **self.extra_env}

    def airflow(self, *args: str, timeout: float = 300) -> str:
        out = subprocess.run([AIRFLOW, *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            raise RuntimeError(f"airflow {' '.join(args)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
        return out.stdout

    def create(self) -> None:
        """A fresh database, `airflow db migrate`, and the training pool."""
        (self.base / "airflow").mkdir(parents=True, exist_ok=True)
        (self.base / "no-plugins").mkdir(exist_ok=True)
        (self.base / "dags").mkdir(exist_ok=True)  # the tenant DAGs only (not maintenance/admin)
        link = self.base / "dags" / "recsys_tenants.py"
        if not link.exists():
            link.symlink_to(ROOT / "dags" / "recsys_tenants.py")
        if self.preload:
            (self.base / "airflow" / "config").mkdir(exist_ok=True)
            shutil.copy(LOCAL_SETTINGS, self.base / "airflow" / "config" / LOCAL_SETTINGS.name)
        _sql(f"{PG}/postgres", f'DROP DATABASE IF EXISTS "{self.name}"', autocommit=True)
        _sql(f"{PG}/postgres", f'CREATE DATABASE "{self.name}"', autocommit=True)
        self.airflow("db", "migrate", timeout=600)
        if self.env["MLFLOW_TRACKING_URI"].startswith("sqlite:"):
            # create MLflow's tables once: tenants' first train tasks would race to migrate a new
            # sqlite DB (alembic fails on one of them); deployments run an MLflow server instead
            code = "import mlflow, sys; mlflow.MlflowClient(sys.argv[1]).search_experiments()"
            out = subprocess.run(
                [sys.executable, "-c", code, self.env["MLFLOW_TRACKING_URI"]], env=self.env, capture_output=True
            )
            if out.returncode != 0:
                raise RuntimeError(f"MLflow DB init failed: {out.stderr[-2000:]!r}")
        self.airflow("pools", "set", "training", str(self.training_slots), "model fitting")

    def start(self, *components: tuple[str, ...], name: str | None = None, env: dict[str, str] | None = None) -> None:
        """Start each component (argv after `airflow`), logging to base/logs/<name>.log."""
        (self.base / "logs").mkdir(exist_ok=True)
        for argv in components:
            key = name or "-".join(a for a in argv if not a.startswith("-"))[:60]
            log = open(self.base / "logs" / f"{key}.log", "wb")  # noqa: SIM115 (closed with the process)
            self.procs[key] = subprocess.Popen(
                [AIRFLOW, *argv],
                env={**self.env, **(env or {})},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def start_core(self) -> None:
        self.start(("api-server", "--apps", "execution", "--port", str(self.port), "--host", "127.0.0.1"))
        self.wait_http(f"http://127.0.0.1:{self.port}/execution/health", 120)
        self.start(("dag-processor",), ("scheduler",))

    def wait_http(self, url: str, timeout: float) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                with urllib.request.urlopen(url, timeout=2):
                    return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"{url} did not answer in {timeout} s; logs in {self.base / 'logs'}")

    def check_alive(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                tail = (self.base / "logs" / f"{name}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"airflow {name} exited with {p.returncode}:\n{tail}")

    def runs(self) -> dict[str, str]:
        return dict(_sql(self.db_url, "SELECT dag_id, state FROM dag_run"))

    def wait_runs(self, dag_ids: list[str], timeout: float) -> dict[str, str]:
        """Until every DAG has a finished run (success or failed); the states by dag_id."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            states = self.runs()
            if all(states.get(d) in ("success", "failed") for d in dag_ids):
                return states
            time.sleep(2)
        raise TimeoutError(f"runs not finished after {timeout} s: {self.runs()}")

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self.procs.clear()

    def drop(self) -> None:
        _sql(f"{PG}/postgres", f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)', autocommit=True)

    def task_rows(self) -> list[dict[str, Any]]:
        """Every task instance with its timestamps (epoch seconds) and the task's own timing."""
        rows = _sql(
            self.db_url,
            """SELECT ti.dag_id, ti.task_id, ti.state, ti.hostname, ti.queue, ti.try_number,
                      extract(epoch from ti.scheduled_dttm), extract(epoch from ti.queued_dttm),
                      extract(epoch from ti.start_date), extract(epoch from ti.end_date),
                      extract(epoch from dr.start_date), x.value
               FROM task_instance ti JOIN dag_run dr ON dr.dag_id = ti.dag_id AND dr.run_id = ti.run_id
               LEFT JOIN xcom x ON x.dag_id = ti.dag_id AND x.run_id = ti.run_id AND x.task_id = ti.task_id
                                AND x.key = 'return_value'""",
        )
        out = []
        for dag_id, task_id, state, host, queue, tries, sched, queued, start, end, run_start, value in rows:
            if isinstance(value, str):
                value = json.loads(value)
            out.append(
                {
                    "dag_id": dag_id,
                    "task_id": task_id,
                    "state": state,
                    "hostname": host,
                    "queue": queue,
                    "try_number": tries,
                    "scheduled": _f(sched),
                    "queued": _f(queued),
                    "start": _f(start),
                    "end": _f(end),
                    "run_start": _f(run_start),
                    "timing": (value or {}).get("task_timing") if isinstance(value, dict) else None,
                }
            )
        return out


def _f(x: Any) -> float | None:
    return None if x is None else float(x)


def task_parts(rows: list[dict[str, Any]], order: tuple[str, ...]) -> list[dict[str, Any]]:
    """Where each task's time went (seconds), for every task that ran to success.

    From the moment a task could run (its upstream task ended; the run started, for the
    first) to its end: `schedule` (until the scheduler marked it scheduled), `queue` (until it
    was queued to the executor), `start` (until the supervisor reported it running: waiting
    for a free executor slot, then the fork), `bootstrap` (task runner start and DAG parse, up
    to the stage adapter), `imports` (the stage's module and what it pulls in), `stage` (the
    stage itself: `cpu` seconds of it, the rest `wait`: I/O and waiting for a CPU) and
    `finish` (XCom, state, exit). `overhead` is everything but `stage`.
    """
    by_run: dict[str, dict[str, dict[str, Any]]] = {}
    for r in rows:
        by_run.setdefault(r["dag_id"], {})[r["task_id"]] = r
    out = []
    for tasks in by_run.values():
        previous_end = None
        for name in order:
            r = tasks.get(name)
            if r is None or r["state"] != "success" or r["timing"] is None:
                previous_end = None
                continue
            ready = previous_end if previous_end is not None else r["run_start"]
            t = r["timing"]
            p = {
                "task_id": name,
                "schedule": r["scheduled"] - ready,
                "queue": r["queued"] - r["scheduled"],
                "start": r["start"] - r["queued"],
                "bootstrap": t["entered"] - r["start"],
                "imports": t["import_s"],
                "stage": t["stage_s"],
                "cpu": t["stage_cpu_s"],
                "wait": max(0.0, t["stage_s"] - t["stage_cpu_s"]),
                "finish": r["end"] - t["returned"],
            }
            p["overhead"] = r["end"] - ready - p["stage"]
            out.append(p)
            previous_end = r["end"]
    return out


PARTS = ("schedule", "queue", "start", "bootstrap", "imports", "stage", "cpu", "wait", "finish", "overhead")


def summarise(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and median of each part. `overhead_no_capacity_wait` is the mean overhead with
    `queue` and `start` at their medians: a task that waited for a pool slot (training) or a
    free executor slot waited for capacity, not for the machinery, and those waits are few
    and long (they move the mean, not the median)."""
    if not parts:
        return {"tasks": 0}
    mean = {k: round(float(np.mean([p[k] for p in parts])), 3) for k in PARTS}
    median = {k: round(float(np.median([p[k] for p in parts])), 3) for k in PARTS}
    capacity_wait = (mean["queue"] - median["queue"]) + (mean["start"] - median["start"])
    return {
        "tasks": len(parts),
        "mean_seconds": mean,
        "median_seconds": median,
        "p90_overhead": round(float(np.percentile([p["overhead"] for p in parts], 90)), 3),
        "capacity_wait": round(capacity_wait, 3),
        "overhead_no_capacity_wait": round(mean["overhead"] - capacity_wait, 3),
    }


def wall_time(rows: list[dict[str, Any]]) -> float:
    starts = [r["run_start"] for r in rows if r["run_start"]]
    ends = [r["end"] for r in rows if r["end"]]
    return round(max(ends) - min(starts), 2) if starts and ends else 0.0


def machine() -> dict[str, Any]:
    model = ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "")
    except OSError:
        pass
    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "load_avg_at_start": list(os.getloadavg()),
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def cleanup(base: Path) -> None:
    shutil.rmtree(base, ignore_errors=True)
