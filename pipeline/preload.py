"""Import the heavy libraries once in the process that forks Airflow's task processes.

Every task of a tenant's DAG is a process forked (by the LocalExecutor's workers, or a Celery
worker) from a process that has imported Airflow but none of what stages need. Each task then
imports numpy, pandas and pyarrow (every stage), torch (select, train, evaluate, gate,
refit), MLflow (train, refit, publish) and Great Expectations (validate) itself: seconds of
CPU per task, the largest part of a small tenant's task overhead (benchmarks/tenants.py).
Imported once in the forking process instead, they are inherited copy-on-write by every
task it starts. Only third-party libraries: the pipeline's own modules are imported by each
task, so a task always runs the code on disk (a library upgrade needs a worker restart, as
it does anyway).

`include/airflow/config/airflow_local_settings.py` calls `preload_for(sys.argv)`; Airflow
imports that file in every component, so only the processes that fork tasks preload:
`airflow scheduler` (its LocalExecutor workers are forked from it) and `airflow celery
worker`. `RECSYS_PRELOAD` names the modules (comma-separated; empty: preload nothing).
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from collections.abc import Sequence

log = logging.getLogger(__name__)

# what the stages import at module level (numpy .. safetensors) or inside their functions
# (faiss: index; mlflow: train, refit, publish; great_expectations: validate)
DEFAULT_MODULES = "numpy,pandas,pyarrow,pyarrow.parquet,scipy.sparse,torch,safetensors,faiss,mlflow,great_expectations"
# argv after the `airflow` executable, of the components that fork task processes
FORKING_COMMANDS = (("scheduler",), ("celery", "worker"))


def forks_tasks(argv: Sequence[str]) -> bool:
    args = [a for a in argv[1:] if not a.startswith("-")]
    return any(tuple(args[: len(cmd)]) == cmd for cmd in FORKING_COMMANDS)


def preload(modules: Sequence[str]) -> dict[str, float]:
    """Import each module; seconds per module. A missing optional one is logged, not fatal."""
    took = {}
    for name in modules:
        started = time.perf_counter()
        try:
            importlib.import_module(name)
        except ImportError as exc:
            log.warning("recsys preload: cannot import %s: %s", name, exc)
            continue
        took[name] = round(time.perf_counter() - started, 3)
    return took


def preload_for(argv: Sequence[str]) -> dict[str, float]:
    """Preload RECSYS_PRELOAD's modules if this process forks tasks (`argv`: sys.argv)."""
    if not forks_tasks(argv):
        return {}
    modules = [m.strip() for m in os.environ.get("RECSYS_PRELOAD", DEFAULT_MODULES).split(",") if m.strip()]
    took = preload(modules)
    if took:
        log.info("recsys preload for %s: %s", " ".join(argv[1:3]), took)
    return took
