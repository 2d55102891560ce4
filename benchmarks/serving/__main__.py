"""`python -m benchmarks.serving`: the CLI and the run (see the package docstring for what it measures)."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import secrets
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import benchmarks.serving as pkg
from benchmarks.serving import P99_TARGET_MS, ROOT, TENANT, report
from benchmarks.serving.calibrate import calibrate
from benchmarks.serving.loadgen import run_loadgen
from benchmarks.serving.measure import find_max_rate, measure
from benchmarks.serving.release import delete_redis_keys, load_into_redis, publish_synthetic
from benchmarks.serving.server import settle, start_server


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serving", description=pkg.__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--out", default=None, help="default benchmarks/results/serving.json (serving_twostage.json with --two-stage)"
    )
    parser.add_argument(
        "--two-stage",
        action="store_true",
        help="serve a real two-stage release (ML-100K demo tenant through the chain, benchmarks/twostage_serving.py) "
        "and the same release without its ranker, at the same fixed rates: the ranker's HTTP cost "
        "(--items/--dim/--users/--index-kind/--no-candidates do not apply; no search, no overload)",
    )
    parser.add_argument("--quick", action="store_true", help="~1 minute smoke run (short windows, fewer users)")
    parser.add_argument("--rates", type=float, nargs="+", default=None, help="req/s (default 200 500 1000)")
    parser.add_argument("--duration", type=float, default=None, help="measured seconds per rate (default 20)")
    parser.add_argument("--warmup", type=float, default=None, help="warm-up seconds before each rate (default 5)")
    parser.add_argument("--items", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--users", type=int, default=None, help="default 100000 (20000 with --quick)")
    parser.add_argument(
        "--index-kind", default=None, help="index.kind of the release: auto (default: flat at 50k items), flat, hnsw"
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="uvicorn workers (default: cpus)")
    parser.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/13"))
    parser.add_argument("--unknown-frac", type=float, default=0.05)
    parser.add_argument("--similar-frac", type=float, default=0.10)
    parser.add_argument("--connections", type=int, default=256, help="generator's max open connections")
    parser.add_argument("--timeout", type=float, default=5.0, help="per-request timeout (counted as an error)")
    parser.add_argument("--p99-target-ms", type=float, default=P99_TARGET_MS)
    parser.add_argument("--search-steps", type=int, default=None, help="bisection steps for max throughput (4)")
    parser.add_argument("--search-duration", type=float, default=None, help="seconds per search step (10)")
    parser.add_argument("--no-search", action="store_true", help="skip the max-throughput search")
    parser.add_argument(
        "--no-calibrate", action="store_true", help="skip measuring the generator's floor against a null server"
    )
    parser.add_argument("--access-log", action="store_true", help="keep uvicorn's access log on (off by default)")
    parser.add_argument(
        "--rate-limit",
        default="1000000/second",
        help="RECSYS_RATE_LIMIT for the server: the limiter stays in the request path (its Redis round trip is "
        "measured) with a limit above any offered load; '' turns it off, 'default' keeps the app's default",
    )
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for the server (repeatable), e.g. OMP_NUM_THREADS=1; recorded in the JSON",
    )
    parser.add_argument(
        "--server-nice",
        type=int,
        default=0,
        help="run uvicorn at this nice value (negative needs root): on a box shared with other jobs, "
        "e.g. -10 approximates a dedicated machine; the generator then runs at the same or higher priority",
    )
    parser.add_argument(
        "--no-candidates",
        action="store_true",
        help="publish without candidates.npy (every known user is a live FAISS search, as before it existed)",
    )
    parser.add_argument(
        "--overload-factor",
        type=float,
        default=2.5,
        help="after the search, offer this multiple of the best passing rate and report admitted p99, "
        "the share shed (503) and timeouts; 0 skips",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp folder and Redis keys (debugging)")
    args = parser.parse_args(argv)
    if args.rate_limit == "default":
        args.rate_limit = None
    if args.out is None:
        name = "serving_twostage.json" if args.two_stage else "serving.json"
        args.out = str(ROOT / "benchmarks" / "results" / name)
    return args


def server_env(
    args: argparse.Namespace, tmp: Path, artifact_root: str, prefix: str, api_key: str, tenant: str = TENANT
) -> dict:
    """The server's environment: Redis on, real API-key auth (the key's sha256 in a keys file)."""
    keys_file = tmp / "api_keys.yaml"
    keys_file.write_text(f"{tenant}: [{hashlib.sha256(api_key.encode()).hexdigest()}]\n")
    env = {
        **os.environ,
        "RECSYS_HOME": str(tmp / "home"),
        "RECSYS_ARTIFACT_ROOT": artifact_root,
        "RECSYS_REDIS_URL": args.redis_url,
        "RECSYS_REDIS_PREFIX": prefix,
        "RECSYS_API_KEYS_FILE": str(keys_file),
        "RECSYS_AUTH_DISABLED": "0",
        # as deployed: each worker loads the tenant at startup (readyz 503 until then), not on
        # the first request that happens to reach it, which could fall inside a measured window
        "RECSYS_SERVING_TENANTS": tenant,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    if args.rate_limit is not None:
        env["RECSYS_RATE_LIMIT"] = args.rate_limit
    return env


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.two_stage:
        from benchmarks.serving.twostage import run_two_stage

        run_two_stage(args)
        return
    q = args.quick
    rates = args.rates or ([200.0, 500.0] if q else [200.0, 500.0, 1000.0])
    duration = args.duration or (6.0 if q else 20.0)
    warmup = args.warmup if args.warmup is not None else (2.0 if q else 5.0)
    n_users = args.users or (20_000 if q else 100_000)
    steps = args.search_steps if args.search_steps is not None else (2 if q else 4)
    search_duration = args.search_duration or (5.0 if q else 10.0)
    redis_url = args.redis_url
    prefix = f"bench-serving-{uuid.uuid4().hex[:10]}"
    started = time.perf_counter()

    tmp = Path(tempfile.mkdtemp(prefix="recsys-bench-serving-"))
    server = None
    try:
        artifact_root = str(tmp / "artifacts")
        t = time.perf_counter()
        release_id, data_stats = publish_synthetic(
            artifact_root, args.items, args.dim, n_users, args.index_kind, with_candidates=not args.no_candidates
        )
        print(f"release {release_id}: {args.items} items x {args.dim} dims, {n_users} users, "
              f"seen/user {data_stats['seen_per_user']} ({time.perf_counter() - t:.1f}s)", flush=True)  # fmt: skip
        t = time.perf_counter()
        redis_stats = load_into_redis(artifact_root, release_id, redis_url, prefix)
        print(f"redis: {redis_stats['payload_bytes'] / 1e6:.1f} MB under {prefix}:* ({time.perf_counter() - t:.1f}s)",
              flush=True)  # fmt: skip

        api_key = secrets.token_urlsafe(24)
        env = server_env(args, tmp, artifact_root, prefix, api_key)
        extra_env = dict(item.split("=", 1) for item in args.server_env)
        env.update(extra_env)
        server = start_server(env, args.workers, tmp / "uvicorn.log", args.access_log, api_key, args.server_nice)
        print(f"server: {' '.join(server.cmd[1:])} (pid {server.proc.pid})", flush=True)
        base_spec = {
            "base": server.base, "api_key": api_key, "tenant": TENANT, "users": n_users, "items": args.items,
            "k": 10, "unknown_frac": args.unknown_frac, "similar_frac": args.similar_frac,
            "connections": args.connections, "timeout": args.timeout, "p99_target_ms": args.p99_target_ms,
            "server_nice": args.server_nice,
        }  # fmt: skip
        # warm every worker (release load is lazy, per worker) at a modest rate
        warm = run_loadgen({**base_spec, "rate": 100.0, "warmup": 0.0, "duration": 4.0 if q else 8.0, "seed": 99})
        # a worker loads the release on its first request; admission control sheds (503) what
        # piles up meanwhile: expected here, any other error is not
        if warm["errors"] - warm["statuses"].get("503", 0):
            raise RuntimeError(f"warm-up had errors: {warm['statuses']} {warm['error_kinds']}\n{server.log_tail()}")
        settle(server)

        print(report.HEADER, flush=True)
        fixed = []
        for rate in rates:
            res = measure(server, {**base_spec, "seed": int(rate)}, rate, duration, warmup, redis_url)
            fixed.append(res)
            print(report.fmt_row(res), flush=True)

        search: list[dict] = []
        best = None
        if not args.no_search:
            best, search = find_max_rate(server, base_spec, fixed, steps, search_duration, warmup, redis_url)

        overload = None
        if args.overload_factor > 0:
            # capacity: the best passing rate, else the most any window achieved
            base = best["target_rps"] if best else max(r["achieved_rps"] for r in fixed + search)
            rate = round(base * args.overload_factor)
            print(f"overload: {rate} req/s offered ({args.overload_factor:g} x {base:g})", flush=True)
            res = measure(server, {**base_spec, "seed": 7}, rate, duration, warmup, redis_url)
            print(report.fmt_row(res) + "   (overload)", flush=True)
            overload = report.overload_summary(res, base, args.overload_factor)
        calibration = None
        if not args.no_calibrate:
            print("generator floor (null HTTP server, same generator, same rates):", flush=True)
            calibration = calibrate(rates, min(duration, 5.0), args.connections)
        result = report.document(
            args,
            n_users=n_users,
            data_stats=data_stats,
            release_id=release_id,
            redis_stats=redis_stats,
            server_command=" ".join(server.cmd[1:]),
            server_env=extra_env,
            warmup=warmup,
            duration=duration,
            fixed=fixed,
            best=best,
            search=search,
            search_duration=search_duration,
            calibration=calibration,
            overload=overload,
        )
    finally:
        if server is not None:
            server.stop()
        if not args.keep:
            with contextlib.suppress(Exception):
                delete_redis_keys(redis_url, prefix)
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"kept {tmp} and Redis keys {prefix}:*")

    result["runtime_s"] = round(time.perf_counter() - started, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    report.print_summary(result, out, args.p99_target_ms)


if __name__ == "__main__":
    main()
