"""Where one serving worker spends its time under load: py-spy samples it from outside.

    .venv/bin/python -m benchmarks.serving.profile [--rate 300] [--duration 12] [--users 20000]
        [--out benchmarks/results/serving_profile.json]

Same release, server and generator as `python -m benchmarks.serving`, with one uvicorn worker;
py-spy (requirements-bench.txt) records that worker while the generator sends `--rate` req/s
and the JSON lists the frames with the most samples: self (the frame itself running) and
inclusive (the frame anywhere on the stack). py-spy sees Python frames only, so time in C
code (numpy, FAISS, socket syscalls) is billed to the Python frame that called it, and an
idle event loop shows up as `Runner.run` self time. How this found the work quota's thread
starts: docs in pipeline/serving/admission.py.
"""

from __future__ import annotations

import argparse
import collections
import json
import secrets
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

from benchmarks.serving import ROOT, TENANT
from benchmarks.serving.__main__ import parse_args as bench_args
from benchmarks.serving.__main__ import server_env
from benchmarks.serving.loadgen import run_loadgen
from benchmarks.serving.release import delete_redis_keys, load_into_redis, publish_synthetic
from benchmarks.serving.report import machine
from benchmarks.serving.server import settle, start_server


def top_frames(raw: str, n: int) -> dict:
    """py-spy's raw (collapsed) stacks -> total samples and the top-n frames, self and inclusive."""
    own: collections.Counter[str] = collections.Counter()
    anywhere: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, count = line.rsplit(" ", 1)
        frames, samples = stack.split(";"), int(count)
        total += samples
        own[frames[-1]] += samples
        anywhere.update(dict.fromkeys(set(frames[1:]), samples))  # [0] is the process itself
    share = lambda c: [{"frame": f, "share": round(v / max(total, 1), 4)} for f, v in c.most_common(n)]  # noqa: E731
    return {"samples": total, "self": share(own), "inclusive": share(anywhere)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serving.profile", description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=300.0)
    parser.add_argument("--duration", type=float, default=12.0)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--raw", help="also keep py-spy's collapsed stacks here (for your own grouping)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serving_profile.json"))
    args = parser.parse_args(argv)
    spy_bin = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if spy_bin is None:
        raise SystemExit("py-spy is not installed: pip install -r requirements-bench.txt -c constraints.txt")
    bench = bench_args(["--workers", "1", "--users", str(args.users)])
    tmp = Path(tempfile.mkdtemp(prefix="recsys-bench-profile-"))
    prefix = f"bench-profile-{uuid.uuid4().hex[:10]}"
    server = None
    try:
        root = str(tmp / "artifacts")
        release_id, _ = publish_synthetic(root, bench.items, bench.dim, args.users, None, with_candidates=True)
        load_into_redis(root, release_id, bench.redis_url, prefix)
        key = secrets.token_urlsafe(24)
        server = start_server(server_env(bench, tmp, root, prefix, key), 1, tmp / "uvicorn.log", False, key, 0)
        spec = {
            "base": server.base, "api_key": key, "tenant": TENANT, "users": args.users, "items": bench.items,
            "k": 10, "unknown_frac": bench.unknown_frac, "similar_frac": bench.similar_frac,
            "connections": bench.connections, "timeout": bench.timeout, "p99_target_ms": bench.p99_target_ms,
            "server_nice": 0,
        }  # fmt: skip
        run_loadgen({**spec, "rate": 100.0, "warmup": 0.0, "duration": 4.0, "seed": 99})
        settle(server)
        raw = tmp / "py-spy.txt"
        spy = subprocess.Popen(
            [spy_bin, "record", "--pid", str(server.proc.pid), "--subprocesses", "--format", "raw", "--rate", "400",
             "--duration", str(int(args.duration + 1)), "--nonblocking", "-o", str(raw)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        load = run_loadgen({**spec, "rate": args.rate, "warmup": 1.0, "duration": args.duration, "seed": 1})
        _, err = spy.communicate(timeout=60)
        if not raw.exists():
            raise SystemExit(f"py-spy wrote nothing (needs ptrace rights): {err.decode(errors='replace')[-500:]}")
        if args.raw:
            shutil.copy(raw, args.raw)
        result = {
            "benchmark": "serving_profile",
            "machine": machine(),
            "rate": args.rate,
            "duration_s": args.duration,
            "load": {k: load.get(k) for k in ("achieved_rps", "errors", "statuses", "p50_ms", "p99_ms", "max_ms")},
            **top_frames(raw.read_text(), args.top),
        }
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result["load"]))
        for row in result["self"][:15]:
            print(f"{row['share']:7.1%}  {row['frame']}")
        print(f"-> {out}")
    finally:
        if server is not None:
            server.stop()
        delete_redis_keys(bench.redis_url, prefix)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
