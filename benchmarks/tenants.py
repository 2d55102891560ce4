"""Many small tenants through a real Airflow scheduler; writes JSON.

    PYTHONPATH=. .venv/bin/python benchmarks/tenants.py [--tenants 100] [--events 20000]
        [--parallelism 4] [--training-slots 2] [--profile tuned|stock] [--out benchmarks/results/tenants.json]

N synthetic tenants (log-normal sizes around --events interactions, long-tailed users and
items: pipeline/samples/synthetic.py), each its own DAG of 11 tasks, run by `airflow
api-server` (execution API) + `dag-processor` + `scheduler` with the LocalExecutor on a
PostgreSQL database of its own (RECSYS_FLEET_PG, default postgresql://postgres@127.0.0.1:5432),
under a temporary AIRFLOW_HOME. Every DAG is created unpaused, so the scheduler starts each
tenant's nightly run (the latest daily interval) as soon as the DAG is parsed: the nightly
burst. The gate is open (every tenant publishes: all 11 tasks run).

Reported: wall time from the first run's start to the last task's end; per task, the mean
split of where the time went (benchmarks/fleet.py `task_parts`: scheduling, queueing, slot
wait and fork, task runner start + DAG parse, stage imports, stage compute and wait,
finish); the DAG file's parse time for one tenant (what a worker pays per task) and for all
of them (what the dag-processor pays per pass); peak memory of the machine and of the
deployment's processes; CPU model, core count and the load average when it started (the
box may be shared).

`--profile stock` runs Airflow's defaults for the knobs `tuned` sets (see PROFILES), so the
two can be compared on the same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.fleet import (  # noqa: E402
    AIRFLOW,
    ROOT,
    Deployment,
    MemorySampler,
    cleanup,
    last_tick,
    machine,
    make_tenants,
    summarise,
    task_parts,
    wall_time,
)
from pipeline.stages import STAGES  # noqa: E402

# Airflow settings per profile (environment variables of every component); `tuned` also
# preloads the stages' libraries in the scheduler (pipeline/preload.py), `stock` does not
PROFILES: dict[str, dict[str, str]] = {
    "stock": {},
    "tuned": {
        # the dag-processor re-parses every tenant's YAML each pass: every 5 min, not every 30 s
        "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "300",
    },
}


def parse_seconds(env: dict[str, str], dag_id: str | None) -> float:
    """Seconds to parse the DAG file in a fresh process that has already imported the task
    SDK (as a task runner has): for one DAG (the parsing context a worker sets) or all."""
    code = (
        "import time, airflow.sdk\n"
        "from airflow.dag_processing.dagbag import DagBag\n"
        "t = time.perf_counter()\n"
        f"bag = DagBag(dag_folder={str(ROOT / 'dags' / 'recsys_tenants.py')!r})\n"
        "print(time.perf_counter() - t, len(bag.dag_ids), len(bag.import_errors))\n"
    )
    extra = {"_AIRFLOW_PARSING_CONTEXT_DAG_ID": dag_id} if dag_id else {}
    out = subprocess.run([sys.executable, "-c", code], env={**env, **extra}, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    seconds, dags, errors = out.stdout.split()[-3:]
    assert int(errors) == 0, out.stderr[-2000:]
    return round(float(seconds), 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tenants", type=int, default=100)
    ap.add_argument("--events", type=float, default=20_000, help="mean interactions per tenant")
    ap.add_argument("--parallelism", type=int, default=4)
    ap.add_argument("--training-slots", type=int, default=2)
    ap.add_argument("--profile", choices=sorted(PROFILES), default="tuned")
    ap.add_argument("--timeout", type=float, default=3 * 3600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder and database")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tenants.json"))
    args = ap.parse_args()

    base = Path(tempfile.mkdtemp(prefix="recsys-fleet-"))
    interval_end = last_tick(datetime.now(UTC))
    dep = Deployment(
        base,
        name=f"recsys_fleet_{os.getpid()}",
        parallelism=args.parallelism,
        training_slots=args.training_slots,
        preload=args.profile != "stock",
        extra_env=PROFILES[args.profile],
    )
    info = machine()
    try:
        names = make_tenants(base, args.tenants, args.events, interval_end, seed=args.seed)
        dag_ids = [f"recsys_{n}" for n in names]
        dep.create()
        parse_one = parse_seconds(dep.env, dag_ids[0])
        parse_all = parse_seconds(dep.env, None)
        print(f"{len(names)} tenants; DAG file parse: {parse_one} s for one tenant, {parse_all} s for all", flush=True)
        with MemorySampler() as mem:
            t0 = time.time()
            dep.start_core()
            states = dep.wait_runs(dag_ids, args.timeout)
            elapsed = time.time() - t0
        rows = [r for r in dep.task_rows() if not r["dag_id"].endswith("_export")]
        parts = task_parts(rows, STAGES)
        result = {
            "benchmark": "tenants",
            "machine": info,
            "profile": args.profile,
            "settings": {
                "executor": dep.executor,
                "parallelism": args.parallelism,
                "training_pool_slots": args.training_slots,
                "preload": dep.preload,
                **PROFILES[args.profile],
            },
            "tenants": len(names),
            "mean_events": args.events,
            "runs": {s: sum(1 for v in states.values() if v == s) for s in set(states.values())},
            "tasks_by_state": {s: sum(1 for r in rows if r["state"] == s) for s in {str(r["state"]) for r in rows}},
            "wall_seconds": wall_time(rows),
            "wall_seconds_from_start": round(elapsed, 2),
            "parse_seconds": {"one_tenant": parse_one, "all_tenants": parse_all},
            "per_task": summarise(parts),
            "per_stage": {s: summarise([p for p in parts if p["task_id"] == s]) for s in STAGES},
            "peak_memory_gb": {
                "machine_used": round(mem.peak_used / 2**30, 2),
                "deployment_pss": round(mem.peak_tree / 2**30, 2),
            },
            "load_avg_at_end": list(os.getloadavg()),
            "tasks": parts,
            "airflow": AIRFLOW,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps({k: result[k] for k in ("runs", "wall_seconds", "per_task", "peak_memory_gb")}, indent=2))
    finally:
        dep.stop()
        if not args.keep:
            dep.drop()
            cleanup(base)
        else:
            print(f"kept {base} and database {dep.name}")


if __name__ == "__main__":
    main()
