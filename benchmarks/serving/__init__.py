"""Serving latency at fixed request rates: real uvicorn workers, Redis, 50k items x 64 dims; writes JSON.

    .venv/bin/python -m benchmarks.serving [--out benchmarks/results/serving.json] [--quick]
        [--rates 200 500 1000] [--duration 20] [--workers N] [--redis-url redis://127.0.0.1:6379/13]

Run from the repository root. What it does, end to end, with the product's own code (one module each):

1. `release`: writes a synthetic release (50k items, 64 dims, 100k users whose seen lists are
   long-tailed: median ~20 items, some users with hundreds) to a temporary artifact root with
   `pipeline.release.format.files_from_vectors` + `publish_release` (FAISS index from
   `pipeline.index.build`), then copies it into Redis with `pipeline.release.refresh.write_release`
   + `flip` under a unique key prefix in a dedicated db.
2. `server`: starts `python -m uvicorn --factory pipeline.serving.app:create_app --workers N` (N
   defaults to os.cpu_count()) with RECSYS_REDIS_URL set and real API-key auth (a fresh key, its
   sha256 in a RECSYS_API_KEYS_FILE), waits for /readyz and warms every worker up.
3. `loadgen`: for each rate, a load generator in a SEPARATE process sends requests at a fixed
   arrival rate (open loop): 85% GET .../users/{known user}/recommendations?k=10, 5% unknown users
   (fallback), 10% GET .../items/{item}/similar?k=10, all with X-API-Key. Latency is measured from
   each request's *scheduled* send time, so a slow server (or a lagging generator) cannot hide
   latency by delaying the next request (no coordinated omission). Errors are non-200s, timeouts
   and connection errors. A warm-up at the same rate precedes every measured window.
4. `measure`: searches the highest rate with p99 <= 20 ms, 0 errors and the rate actually achieved
   (bisection between the fixed rates, bounded number of steps).
5. `report` and `__main__`: write JSON (machine, versions, config, per-rate results, max
   throughput) and print a table; kill the server, delete its own Redis keys and temporary folders.

Why our own generator (asyncio + uvloop + aiohttp, one process) rather than locust or wrk:
wrk is closed-loop (a new request only after a response, so latency under overload is hidden by
coordinated omission) and wrk2, which fixes that, is not packaged. Locust's `constant_throughput`
is closed-loop per simulated user too, and it measured badly here: against a null HTTP server on
this 2-core box, locust 2.47 headless (FastHttpUser, 500 users x 1 req/s) reported p50 27-49 ms
and p99 ~97 ms at 500 req/s, where this generator reports p50 ~0.6 ms and p99 ~4 ms; that noise
alone would fail a 20 ms p99 target. The calibration step (`calibrate`, on by default,
`--no-calibrate` skips it) repeats that measurement on every run: the generator against a null
server in another process at the same rates, i.e. what it reports when the server costs ~0. Each
result also records the generator's CPU use and its send lag (actual minus scheduled send time).
The generator runs at nice -5 where allowed: it stands in for a client on another machine, and its
own scheduling delay should not be billed to the server.

`--two-stage` (`twostage.py`) serves a real release instead: the demo tenant (ML-100K) with
`two_stage` on through the chain, and the same release without its ranker, each by its own
server at the same fixed rates; the difference is the ranker's HTTP cost.

The generator, Redis and the server share the machine's cores; the JSON says how many, and how
much CPU other processes took during each window (`other_processes_cpu_cores`, plus
`other_niced_cpu_cores`); windows where they took more than a quarter of a core are flagged
`disturbed` and listed in `disturbed_windows`.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TENANT = "bench"
INTERVAL_END = "2026-01-01T00:00:00+00:00"
P99_TARGET_MS = 20.0
