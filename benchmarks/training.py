"""Training speed and peak memory per model on a large synthetic tenant; writes JSON.

    .venv/bin/python benchmarks/training.py [--quick] [--only als,bpr] [--threads N]
        [--out benchmarks/results/training.json]

Data: 500k users x 50k items, ~8.5M unique (user, item) pairs with a long tail (Zipf item
popularity, log-normal user activity, taste clusters), generated vectorised and cached
under var/cache/. `--quick`: 50k x 5k, ~850k pairs.

Jobs (each in its own subprocess, so peak RSS is per model; ours first fit a 4-pair tenant,
so compiling or loading numba's cache is not timed: `warmup_seconds`):
  als               our ALS, default config (3 CG steps per solve), `--als-iterations` (15), 64 factors
  als_cholesky      the same with exact Cholesky solves (not run unless named in --only: ~35 min)
  ease              not run unless named in --only: its dense items^2 solve is for smaller catalogs
  implicit_als      implicit 0.7 AlternatingLeastSquares, same (its default: 3 CG steps per solve)
  implicit_als_exact  the same with use_cg=False (Cholesky)
  bpr               our BPR, `--bpr-epochs` (100) epochs, 64 factors, default config otherwise
                    (on the CPU: the compiled per-pair loop; `threads: --threads`, Hogwild above 1)
  implicit_bpr      implicit 0.7 BayesianPersonalizedRanking, the same epochs
                    (BPR rows also carry projected_100_epochs_seconds: setup + 100 x per epoch)
  <every other kind in pipeline.models.registry.KINDS> (two_tower, graphsage, ...): default
                    config, `--epochs-other` epochs (default 1), seconds per epoch
Threads: BLAS is pinned to 1 thread per process (OPENBLAS/MKL/OMP_NUM_THREADS=1, as
implicit recommends); the models' own parallelism gets `--threads` (default 1: on a shared
2-core box OpenMP threads spin on barriers while another process holds a core):
torch.set_num_threads for ours, num_threads for implicit's. Every row records its
threads, wall seconds, CPU seconds (user + system, all threads: steadier than wall time
when other work shares the box), seconds per epoch, peak RSS (ru_maxrss of the subprocess),
the load average before and after, and the thread pools loaded (threadpoolctl: which BLAS,
OpenMP). The result records the CPU model (lscpu) and torch's build configuration (its BLAS).
A job that exceeds `--job-timeout` is recorded as a timeout, not dropped.

Before/after in one run: `--baseline DIR` (a checkout of another commit, e.g.
`git worktree add /tmp/base main`) runs that checkout's `als` and `bpr` jobs too, interleaved
with this one's, as rows with "code": "baseline" (this checkout's: "code": "this").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FULL = {"users": 500_000, "items": 50_000, "pairs": 8_500_000}
QUICK = {"users": 50_000, "items": 5_000, "pairs": 850_000}
REFERENCE = {"implicit_bpr_100_epochs_seconds": 367.0, "note": "the issue's figure for implicit BPR, its machine"}


# --- data ------------------------------------------------------------------------------
def synthetic_pairs(users: int, items: int, pairs: int, clusters: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
    """Unique (user, item, timestamp) with a realistic long tail, no Python loop over rows.

    Item popularity is Zipf (exponent 0.9) over a random id order; user activity is
    log-normal (sigma 1.1, at least 1 pair); half of a user's draws come from their taste
    cluster (popularity-weighted within it), half from the whole catalog. Draws are made
    with inverse-CDF searches, duplicates dropped (oversampling until `pairs` remain), and
    the result cut to `pairs` at random.
    """
    rng = np.random.default_rng(seed)
    pop = 1.0 / np.power(rng.permutation(items) + 1.0, 0.9)
    item_cluster = rng.integers(0, clusters, items)
    user_cluster = rng.integers(0, clusters, users)
    activity = rng.lognormal(0.0, 1.1, users)
    global_cdf = np.cumsum(pop) / pop.sum()
    by_cluster = np.lexsort((np.arange(items), item_cluster))  # items grouped by cluster
    p, c = pop[by_cluster], item_cluster[by_cluster]
    total_of = np.bincount(c, weights=p, minlength=clusters)
    start_of = np.concatenate(([0.0], total_of.cumsum()[:-1]))
    cluster_cdf = c + (np.cumsum(p) - start_of[c]) / total_of[c]  # cluster k's CDF spans [k, k + 1)
    oversample = 1.15
    for _ in range(5):
        draws = np.maximum(1, np.round(activity / activity.sum() * pairs * oversample)).astype(np.int64)
        u = np.repeat(np.arange(users, dtype=np.int64), np.minimum(draws, items // 4))
        r = rng.random(len(u))
        item = np.searchsorted(global_cdf, r).clip(max=items - 1)
        local = rng.random(len(u)) < 0.5
        item[local] = by_cluster[np.searchsorted(cluster_cdf, user_cluster[u[local]] + r[local]).clip(max=items - 1)]
        keys = np.unique(u * items + item)
        if len(keys) >= pairs:
            break
        oversample *= 1.02 * pairs / len(keys)
    if len(keys) > pairs:
        keys = np.sort(rng.choice(keys, pairs, replace=False))
    ts = 1_735_689_600 + rng.integers(0, 90 * 86_400, len(keys))
    return {"user": keys // items, "item": keys % items, "timestamp": ts, "users": users, "items": items}


def load_data(size: dict[str, int], cache: Path) -> Path:
    path = cache / f"training-bench-{size['users']}x{size['items']}-{size['pairs']}.npz"
    if not path.exists():
        t = time.perf_counter()
        d = synthetic_pairs(size["users"], size["items"], size["pairs"])
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **d)
        print(f"generated {len(d['user']):,} pairs in {time.perf_counter() - t:.1f}s -> {path}", flush=True)
    return path


def describe(path: Path) -> dict[str, float]:
    d = np.load(path)
    per_item = np.bincount(d["item"], minlength=int(d["items"]))
    per_user = np.bincount(d["user"], minlength=int(d["users"]))
    top = np.sort(per_item)[::-1]
    return {
        "users": int(d["users"]),
        "items": int(d["items"]),
        "pairs": len(d["user"]),
        "pairs_per_user_median": float(np.median(per_user)),
        "pairs_per_user_p99": float(np.percentile(per_user, 99)),
        "pairs_per_user_max": int(per_user.max()),
        "items_without_pairs": int((per_item == 0).sum()),
        "share_of_pairs_top_1pct_items": round(float(top[: max(1, len(top) // 100)].sum() / top.sum()), 3),
    }


# --- one job, in its own process --------------------------------------------------------
class _Stop(Exception):
    pass


def run_job(name: str, data_path: Path, threads: int, epochs_other: int, bpr_epochs: int, als_iterations: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    d = np.load(data_path)
    users, items = int(d["users"]), int(d["items"])
    row: dict = {"job": name, "threads": threads, "blas_threads": 1}
    if name.startswith("implicit_"):
        row.update(_implicit(name, d, users, items, threads, bpr_epochs, als_iterations))
    else:
        row.update(_ours(name, d, users, items, threads, epochs_other, bpr_epochs, als_iterations))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    row["peak_rss_mb"] = round(usage.ru_maxrss / 1024, 1)
    row["threadpools"] = _threadpools()
    return row


def _threadpools() -> list[dict]:
    """The BLAS and OpenMP libraries loaded in this process and their thread counts (threadpoolctl)."""
    from threadpoolctl import threadpool_info

    keys = ("user_api", "internal_api", "version", "num_threads", "threading_layer", "architecture")
    return [
        {k: v for k, v in info.items() if k in keys} | {"file": Path(info["filepath"]).name}
        for info in threadpool_info()
    ]


def machine() -> dict:
    """CPU model (lscpu), cores, and torch's build configuration: which BLAS its CPU ops use."""
    import torch

    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), "")
    except (OSError, subprocess.CalledProcessError):
        model = ""
    config = torch.__config__.show().splitlines()
    try:
        import numba

        numba_info = {"version": numba.__version__, "num_threads": numba.config.NUMBA_NUM_THREADS}
    except ImportError:
        numba_info = {}
    return {
        "cpu_model": model or platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_blas": [
            ln.strip() for ln in config if any(k in ln for k in ("BLAS", "MKL", "LAPACK", "CPU capability"))
        ],
        "numba": numba_info,
    }


def _ours(
    name: str, d, users: int, items: int, threads: int, epochs_other: int, bpr_epochs: int, als_iterations: int
) -> dict:
    import torch

    from pipeline.config.models import model_config
    from pipeline.models import TrainData, build

    # no ratings: a read-only broadcast NaN, not a 68 MB array implicit's job never allocates (same inputs)
    no_rating = np.broadcast_to(np.float64(np.nan), d["user"].shape)
    data = TrainData(users, items, d["user"], d["item"], d["timestamp"], no_rating)
    overrides = {
        "als": {"factors": 64, "iterations": als_iterations},
        "als_cholesky": {"factors": 64, "iterations": als_iterations, "solver": "cholesky"},
        "bpr": {"factors": 64, "epochs": bpr_epochs, "threads": threads},
    }.get(name, {})
    cfg = model_config({"kind": name.removesuffix("_cholesky"), **overrides})
    warm = time.perf_counter()  # compiled kernels (numba: ALS, BPR) build or load from cache here, not in the timing
    tiny = TrainData(3, 3, np.array([0, 1, 2, 2]), np.array([0, 1, 1, 2]), np.arange(4), np.full(4, np.nan))
    small = {"iterations": 1} if "als" in name else {"epochs": 1}
    build(model_config({**cfg.model_dump(mode="json", exclude={"search"}), **small}), torch.device("cpu")).fit(tiny)
    warmup_seconds = time.perf_counter() - warm
    model = build(cfg, torch.device("cpu"))
    limit = None if name in ("als", "als_cholesky", "bpr") else epochs_other
    stamps: list[float] = []
    losses: list[float] = []

    def progress(epoch: int, values: dict[str, float]) -> None:
        stamps.append(time.perf_counter())
        losses.append(values.get("loss", float("nan")))
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"EPOCH {epoch} {stamps[-1] - started:.3f} {rss:.1f}", flush=True)  # read back after a timeout
        if limit is not None and epoch >= limit:
            raise _Stop

    started = time.perf_counter()
    cpu_started = time.process_time()
    try:
        model.fit(data, callback=progress)
    except _Stop:
        pass
    seconds = time.perf_counter() - started
    cpu_seconds = time.process_time() - cpu_started
    epoch_secs = np.diff([started, *stamps])
    return {
        "cpu_seconds": round(cpu_seconds, 2),
        "warmup_seconds": round(warmup_seconds, 2),
        "config": cfg.model_dump(mode="json", exclude={"search"}),
        "epochs": len(stamps),
        "seconds": round(seconds, 2),
        "first_epoch_seconds": round(float(epoch_secs[0]), 2) if len(stamps) else None,
        "seconds_per_epoch": round(float(np.median(epoch_secs[1:] if len(stamps) > 1 else epoch_secs)), 3)
        if len(stamps)
        else None,
        "loss_first_last": [losses[0], losses[-1]] if losses else None,
        "stopped_after_epochs": limit,
    }


def _implicit(name: str, d, users: int, items: int, threads: int, bpr_epochs: int, als_iterations: int) -> dict:
    import implicit
    import scipy.sparse as sp

    m = sp.csr_matrix((np.ones(len(d["user"]), np.float32), (d["user"], d["item"])), shape=(users, items))
    if name.startswith("implicit_als"):  # implicit_als_exact: Cholesky like ours instead of 3 CG steps
        model = implicit.cpu.als.AlternatingLeastSquares(
            factors=64,
            iterations=als_iterations,
            regularization=0.1,
            alpha=1.0,
            num_threads=threads,
            random_state=0,
            use_cg=not name.endswith("_exact"),
        )
        epochs = als_iterations
    else:
        model = implicit.cpu.bpr.BayesianPersonalizedRanking(
            factors=64, iterations=bpr_epochs, num_threads=threads, random_state=0, verify_negative_samples=True
        )
        epochs = bpr_epochs
    started = time.perf_counter()
    cpu_started = time.process_time()
    model.fit(m, show_progress=False)
    seconds = time.perf_counter() - started
    return {
        "cpu_seconds": round(time.process_time() - cpu_started, 2),
        "library": f"implicit {implicit.__version__}",
        "epochs": epochs,
        "seconds": round(seconds, 2),
        "seconds_per_epoch": round(seconds / epochs, 3),
    }


# --- driver -----------------------------------------------------------------------------
def _partial(stdout: bytes | str | None) -> dict:
    """What a timed-out job got through: its EPOCH lines (epoch, seconds since fit start, peak RSS)."""
    text = stdout.decode() if isinstance(stdout, bytes) else stdout or ""
    marks = [line.split()[1:] for line in text.splitlines() if line.startswith("EPOCH ")]
    if not marks:
        return {}
    secs = [float(m[1]) for m in marks]
    per = np.diff([0.0, *secs])
    return {
        "epochs_done": len(marks),
        "seconds_to_last_epoch": secs[-1],
        "first_epoch_seconds": round(float(per[0]), 2),
        "seconds_per_epoch": round(float(np.median(per[1:] if len(per) > 1 else per)), 3),
        "peak_rss_mb_so_far": float(marks[-1][2]),
    }


def jobs(only: list[str] | None) -> list[str]:
    from pipeline.models.registry import KINDS

    names = ["als", "implicit_als", "implicit_als_exact", "bpr", "implicit_bpr"]
    named_only = ("als_cholesky", "ease")  # ease: a dense items^2 solve, 20 GB at 50k items; run it with --only
    names += [k for k in KINDS if k not in ("popularity", "als", "bpr", *named_only)]  # new kinds appear by themselves
    return [n for n in names if not only or n in only] + [n for n in named_only if n in (only or [])]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "training.json"))
    parser.add_argument("--quick", action="store_true", help="50k users x 5k items, ~850k pairs")
    parser.add_argument("--only", default="", help="comma-separated jobs, e.g. als,bpr,implicit_bpr")
    parser.add_argument("--threads", type=int, default=1, help="compute threads per model (1: fair on a busy box)")
    parser.add_argument("--als-iterations", type=int, default=15, help="ALS iterations (ours and implicit's)")
    parser.add_argument("--epochs-other", type=int, default=1, help="epochs timed for the other kinds")
    parser.add_argument(
        "--bpr-epochs", type=int, default=100, help="BPR epochs (ours and implicit's); rows also give x100 projections"
    )
    parser.add_argument("--job-timeout", type=float, default=3600.0, help="seconds before a job is given up")
    parser.add_argument("--cache", default=str(ROOT / "var" / "cache"))
    parser.add_argument("--baseline", default="", help="another checkout whose als/bpr jobs run too (before/after)")
    parser.add_argument("--_job", help=argparse.SUPPRESS)
    parser.add_argument("--_data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._job:
        row = run_job(
            args._job, Path(args._data), args.threads, args.epochs_other, args.bpr_epochs, args.als_iterations
        )
        print("RESULT " + json.dumps(row))
        return
    size = QUICK if args.quick else FULL
    data_path = load_data(size, Path(args.cache))
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    env.setdefault("RECSYS_DEVICE", "cpu")
    rows = []
    only = [s for s in args.only.split(",") if s]
    runs = [(name, "this", Path(__file__)) for name in jobs(only)]
    if args.baseline:  # each baseline job right after this checkout's, so both see about the same load
        base = Path(args.baseline).resolve() / "benchmarks" / "training.py"
        runs = [
            r for this in runs for r in [this] + ([(this[0], "baseline", base)] if this[0] in ("als", "bpr") else [])
        ]
    for name, code, script in runs:
        cmd = [sys.executable, str(script), "--_job", name, "--_data", str(data_path), "--threads", str(args.threads)]
        cmd += ["--epochs-other", str(args.epochs_other), "--bpr-epochs", str(args.bpr_epochs)]
        cmd += ["--als-iterations", str(args.als_iterations)]
        load_before = os.getloadavg()[0]
        started = time.perf_counter()
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.job_timeout)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            row = json.loads(lines[-1][7:]) if lines else {"job": name, "error": proc.stderr[-2000:]}
        except subprocess.TimeoutExpired as exc:
            row = {"job": name, "error": f"timeout after {args.job_timeout:.0f}s", **_partial(exc.stdout)}
        row["code"] = code
        target = 100 if "bpr" in name else 15 if "als" in name else None
        if target and row.get("seconds_per_epoch"):  # setup + the target epochs at the measured pace
            row[f"projected_{target}_epochs_seconds"] = round(
                row["seconds"] + (target - row["epochs"]) * row["seconds_per_epoch"], 1
            )
        row["load_average_before"] = round(load_before, 2)
        done = resource.getrusage(resource.RUSAGE_CHILDREN)  # the job's whole process, setup included
        row["cpu_seconds_process"] = round(done.ru_utime + done.ru_stime - children.ru_utime - children.ru_stime, 2)
        row["load_average_after"] = round(os.getloadavg()[0], 2)
        row["wall_seconds_with_startup"] = round(time.perf_counter() - started, 1)
        rows.append(row)
        keys = ("seconds", "cpu_seconds", "seconds_per_epoch", "epochs", "peak_rss_mb", "threads", "error")
        label = f"{name}@{code}" if args.baseline else name
        print(f"{label:<18} " + "  ".join(f"{k}={row[k]}" for k in keys if k in row), flush=True)
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "data": describe(data_path),
        "quick": args.quick,
        "machine": machine(),
        "threads": {"compute": args.threads, "blas": 1},
        "reference": REFERENCE,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
