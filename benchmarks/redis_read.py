"""How serving should read a user from Redis: sync in the route's thread, sync through an extra
threadpool hop, or redis.asyncio on the event loop. Per-read wall time and CPU, one process.

    .venv/bin/python -m benchmarks.redis_read [--redis-url redis://127.0.0.1:6379/13] [--n 3000]

Routes already run in Starlette's threadpool (numpy/FAISS work), so (a) costs no hop at all;
(b) is what an async route would pay to call the sync client; (c) is redis.asyncio awaited
on the loop. Writes benchmarks/results/redis_read.json; keys under a fresh prefix, deleted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/13")
    ap.add_argument("--n", type=int, default=3000)
    args = ap.parse_args()

    import redis
    import redis.asyncio as aredis
    from starlette.concurrency import run_in_threadpool

    from pipeline.storage.redis import serving_redis_client

    prefix = f"bench-redis-read-{uuid.uuid4().hex[:8]}"
    sync = serving_redis_client(args.redis_url, 50)
    keys = [f"{prefix}:{i}:{part}" for i in range(100) for part in ("fu", "fseen", "u", "seen")]
    sync.mset({k: np.ones(64, dtype=np.float32).tobytes() for k in keys})
    batches = [keys[4 * (i % 100) : 4 * (i % 100) + 4] for i in range(args.n)]

    def timed(label: str, run) -> dict[str, float]:
        cpu, wall = time.process_time(), time.perf_counter()
        run()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        return {"label": label, "us_per_read": wall / args.n * 1e6, "cpu_us_per_read": cpu / args.n * 1e6}

    def in_thread() -> None:
        for b in batches:
            sync.mget(b)

    async def hop() -> None:
        for b in batches:
            await run_in_threadpool(sync.mget, b)

    async def native() -> None:
        client = aredis.Redis.from_url(args.redis_url, socket_timeout=0.05, socket_connect_timeout=0.05)
        for b in batches:
            await client.mget(b)
        await client.aclose()

    results = [
        timed("sync mget in the route's thread (no hop)", in_thread),
        timed("sync mget via run_in_threadpool (one hop)", lambda: asyncio.run(hop())),
        timed("redis.asyncio mget on the event loop", lambda: asyncio.run(native())),
    ]
    for k in sync.scan_iter(match=f"{prefix}:*", count=1000):
        sync.delete(k)
    out = Path("benchmarks/results/redis_read.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"n": args.n, "redis_version": redis.__version__, "results": results}, indent=2))
    for r in results:
        print(f"{r['label']:45s} {r['us_per_read']:8.1f} us wall  {r['cpu_us_per_read']:8.1f} us CPU")


if __name__ == "__main__":
    main()
