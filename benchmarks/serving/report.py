"""The benchmark's output: the pass criterion, the printed table, and the JSON document."""

from __future__ import annotations

import contextlib
import os
import platform
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

DISTURBED_CORES = 0.25  # CPU taken by other processes above which a window is flagged


def passes(res: dict, p99_ms: float) -> bool:
    return (
        res["errors"] == 0
        and res.get("p99_ms") is not None
        and res["p99_ms"] <= p99_ms
        and res["achieved_rps"] >= 0.97 * res["target_rps"]
    )


def fmt_row(res: dict) -> str:
    def f(v):
        return f"{v:8.2f}" if isinstance(v, (int, float)) else f"{'-':>8}"

    return (
        f"{res['target_rps']:>7.0f} {res['achieved_rps']:>9.1f} {f(res.get('p50_ms'))} {f(res.get('p95_ms'))} "
        f"{f(res.get('p99_ms'))} {f(res.get('max_ms'))} {res['errors']:>7d} "
        f"{(res.get('server_cpu_cores') or 0):>6.2f} {res['generator_cpu_fraction']:>6.2f} "
        f"{(res.get('other_processes_cpu_cores') or 0) + (res.get('other_niced_cpu_cores') or 0):>6.2f} "
        f"{'yes' if res['passes_p99_target'] else 'no':>5}"
        f"{'  (disturbed: other processes used CPU)' if res.get('disturbed') else ''}"
    )


HEADER = (
    f"{'target':>7} {'achieved':>9} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'max ms':>8} {'errors':>7} "
    f"{'srvCPU':>6} {'genCPU':>6} {'other':>6} {'ok?':>5}"
)


def versions() -> dict:
    out = {}
    for dist in ("fastapi", "starlette", "uvicorn", "uvloop", "httptools", "pydantic", "numpy", "faiss-cpu",
                 "redis", "aiohttp", "psutil"):  # fmt: skip
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def machine() -> dict:
    info = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or None,
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(Exception):
        from pipeline.storage.redis import redis_client

        r = redis_client(os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/13"))
        info["redis_version"] = r.info("server")["redis_version"]
        r.close()
    return info


def document(
    args,
    *,
    n_users: int,
    data_stats: dict,
    release_id: str,
    redis_stats: dict,
    server_command: str,
    server_env: dict[str, str],
    warmup: float,
    duration: float,
    fixed: list[dict],
    best: dict | None,
    search: list[dict],
    search_duration: float,
    calibration: list[dict] | None,
    overload: dict | None = None,
) -> dict:
    """The JSON the benchmark writes (`runtime_s` is filled in by the caller at the very end)."""
    target_500 = next((r for r in fixed if r["target_rps"] == 500.0), None)
    return {
        "benchmark": "serving latency at fixed arrival rates (open loop)",
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": versions(),
        "config": {
            "items": args.items,
            "dims": args.dim,
            "users": n_users,
            "data": data_stats,
            "release_id": release_id,
            "workers": args.workers,
            "server_command": server_command,
            "access_log": args.access_log,
            "server_env": server_env,
            "server_nice": args.server_nice,
            "redis": True,
            "redis_url": args.redis_url,
            "redis_load": redis_stats,
            "auth": "X-API-Key (sha256 hashes file)",
            "rate_limit": "app default" if args.rate_limit is None else (args.rate_limit or "off"),
            "mix": {
                "recommendations_known_user": round(1 - args.unknown_frac - args.similar_frac, 3),
                "recommendations_unknown_user": args.unknown_frac,
                "similar_items": args.similar_frac,
                "k": 10,
            },
            "generator": {
                "kind": "own open-loop asyncio generator (benchmarks/serving/loadgen.py), separate process",
                "client": "aiohttp, keep-alive",
                "event_loop": fixed[0].get("event_loop") if fixed else None,
                "arrivals": "fixed interval (1/rate); latency from scheduled send time",
                "max_connections": args.connections,
                "nice": fixed[0].get("generator_nice") if fixed else None,
                "timeout_s": args.timeout,
            },
            "warmup_s": warmup,
            "duration_s": duration,
            "quick": args.quick,
            "shared_cores": "server workers, Redis and the generator share the same cpus",
        },
        "targets": {
            "p99_ms_at_500_rps": args.p99_target_ms,
            "errors_at_500_rps": 0,
            "met": None if target_500 is None else passes(target_500, args.p99_target_ms),
        },
        "rates": fixed,
        "max_throughput": {
            "criterion": f"p99 <= {args.p99_target_ms} ms, 0 errors, achieved >= 97% of target",
            "rps": None if best is None else best["achieved_rps"],
            "target_rps": None if best is None else best["target_rps"],
            "p99_ms": None if best is None else best.get("p99_ms"),
            "search": search,
            "search_duration_s": search_duration,
        },
        "disturbed_windows": [
            r["target_rps"] for r in fixed + search if r.get("disturbed")
        ],  # other processes took > DISTURBED_CORES of CPU: numbers there understate the server
        "overload": overload,
        "calibration_null_server": calibration,
        "runtime_s": None,
    }


def overload_summary(res: dict, capacity_rps: float, factor: float) -> dict:
    """What admission control did at `factor` x the best passing rate: the admitted requests'
    latency, the share shed with 503, and the failures that are not a fast 503 (timeouts...)."""
    sent = max(res["sent"], 1)
    shed = res["statuses"].get("503", 0)
    return {
        "capacity_rps": capacity_rps,
        "factor": factor,
        "offered_rps": res["offered_rps"],
        "admitted_rps": res["achieved_rps"],
        "admitted_p50_ms": res.get("p50_ms"),
        "admitted_p99_ms": res.get("p99_ms"),
        "shed_503": shed,
        "shed_share": round(shed / sent, 3),
        "timeouts": sum(v for k, v in res["error_kinds"].items() if "imeout" in k),
        "other_errors": res["errors"] - shed,
        "statuses": res["statuses"],
        "window": res,
    }


def print_summary(result: dict, out: Path, p99_target_ms: float) -> None:
    mt = result["max_throughput"]
    print(f"max throughput with p99 <= {p99_target_ms:g} ms and 0 errors: "
          f"{mt['rps'] if mt['rps'] is not None else 'n/a'} req/s "
          f"(target {mt['target_rps']}, p99 {mt['p99_ms']} ms)")  # fmt: skip
    if result["targets"]["met"] is not None:
        print(f"target p99 <= {p99_target_ms:g} ms at 500 req/s with 0 errors: "
              f"{'met' if result['targets']['met'] else 'NOT met'}")  # fmt: skip
    ov = result.get("overload")
    if ov:
        print(f"overload at {ov['offered_rps']} req/s ({ov['factor']:g} x {ov['capacity_rps']:g}): admitted "
              f"{ov['admitted_rps']} req/s, p99 {ov['admitted_p99_ms']} ms; shed (503) {ov['shed_share']:.1%}; "
              f"timeouts {ov['timeouts']}, other errors {ov['other_errors']}")  # fmt: skip
    if result["disturbed_windows"]:
        print(
            f"WARNING: other processes used > {DISTURBED_CORES} cores during the windows at "
            f"{result['disturbed_windows']} req/s: rerun on a quiet machine to compare numbers"
        )
    print(f"wrote {out} ({result['runtime_s']:.0f}s)")
