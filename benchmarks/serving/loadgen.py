"""The open-loop load generator: one process of its own (`python -m benchmarks.serving.loadgen`,
a JSON spec on stdin, a JSON result on stdout), so its event loop has its own GIL and core.

Requests are scheduled at fixed intervals and latency counts from the scheduled send time, so
a slow server cannot hide queueing behind a late next request (no coordinated omission).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import resource
import subprocess
import sys
import time
from urllib.parse import quote

from benchmarks.serving import ROOT


def _percentiles(lat_ms: list[float]) -> dict:
    if not lat_ms:
        return {"count": 0}
    s = sorted(lat_ms)

    def q(p: float) -> float:
        return round(s[min(len(s) - 1, max(0, int(round(p / 100 * len(s))) - 1))], 2)  # nearest rank

    return {
        "count": len(s),
        "p50_ms": q(50),
        "p95_ms": q(95),
        "p99_ms": q(99),
        "p999_ms": q(99.9),
        "max_ms": round(s[-1], 2),
        "mean_ms": round(sum(s) / len(s), 2),
    }


def make_targets(spec: dict, n: int, rng: random.Random) -> list[tuple[str, str]]:
    """(kind, path) of n requests in the benchmark's mix. Ids are `u{n}` < spec["users"] and
    `i{n}` < spec["items"] (the synthetic release), or drawn from spec["user_ids"] and
    spec["item_ids"] when given (a real release's ids; same draws from `rng`)."""
    t = spec["tenant"]
    k = spec.get("k", 10)
    user_ids, item_ids = spec.get("user_ids"), spec.get("item_ids")

    def draw(ids: list[str] | None, n: int, letter: str) -> str:
        return quote(ids[rng.randrange(len(ids))], safe="") if ids else f"{letter}{rng.randrange(n)}"

    def user() -> str:
        return draw(user_ids, spec.get("users", 0), "u")

    def item() -> str:
        return draw(item_ids, spec.get("items", 0), "i")

    out = []
    for i in range(n):
        x = rng.random()
        if x < spec["similar_frac"]:
            out.append(("similar", f"/v1/tenants/{t}/items/{item()}/similar?k={k}"))
        elif x < spec["similar_frac"] + spec["unknown_frac"]:
            out.append(
                ("unknown_user", f"/v1/tenants/{t}/users/nobody-{i}-{rng.randrange(1 << 30)}/recommendations?k={k}")
            )
        else:
            out.append(("user", f"/v1/tenants/{t}/users/{user()}/recommendations?k={k}"))
    return out


async def _generate(spec: dict) -> dict:
    import aiohttp

    rate, warmup, duration = float(spec["rate"]), float(spec["warmup"]), float(spec["duration"])
    total_s = warmup + duration
    n = int(rate * total_s)
    rng = random.Random(spec.get("seed", 0))
    targets = make_targets(spec, n, rng) if spec.get("mix", True) else [("fixed", spec.get("path", "/"))] * n
    clock = time.perf_counter  # not loop.time(): uvloop's clock has millisecond resolution
    connector = aiohttp.TCPConnector(limit=spec["connections"], ttl_dns_cache=None, force_close=False)
    timeout = aiohttp.ClientTimeout(total=spec["timeout"])
    headers = {"X-API-Key": spec["api_key"]} if spec.get("api_key") else {}
    results: list[tuple[float, str, int, float, float] | None] = [None] * n  # sched, kind, status, latency, lag
    failures: dict[int, str] = {}  # request -> why it got no response (timeout, connection error)

    async with aiohttp.ClientSession(spec["base"], connector=connector, timeout=timeout, headers=headers) as session:

        async def touch() -> None:  # open a few connections before the clock starts
            async with session.get("/healthz") as resp:
                await resp.read()

        await asyncio.gather(*(touch() for _ in range(min(16, spec["connections"]))), return_exceptions=True)

        async def one(i: int, sched: float) -> None:
            kind, path = targets[i]
            lag = clock() - sched
            status = -1
            try:
                async with session.get(path) as resp:
                    await resp.read()
                    status = resp.status
            except TimeoutError:
                failures[i] = "timeout"
            except aiohttp.ClientError as exc:
                failures[i] = type(exc).__name__
            results[i] = (sched, kind, status, (clock() - sched) * 1e3, lag * 1e3)

        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        interval = 1.0 / rate
        start = clock() + 0.05
        tasks = []
        i = 0
        while i < n:  # launch every request whose scheduled time has come, then sleep to the next one
            now = clock()
            while i < n and start + i * interval <= now:
                tasks.append(asyncio.create_task(one(i, start + i * interval)))
                i += 1
            if i < n:
                await asyncio.sleep(max(0.0, start + i * interval - clock()))
        sent_at = clock()
        await asyncio.gather(*tasks)
        end = clock()
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)

    first = next((j for j, r in enumerate(results) if r is not None and r[0] >= start + warmup), n)
    measured = [r for r in results[first:] if r is not None]
    error_kinds: dict[str, int] = {}
    for j, why in failures.items():
        if j >= first:
            error_kinds[why] = error_kinds.get(why, 0) + 1
    ok = [r for r in measured if r[2] == 200]
    statuses: dict[str, int] = {}
    for r in measured:
        statuses[str(r[2])] = statuses.get(str(r[2]), 0) + 1
    by_kind = {}
    for kind in sorted({r[1] for r in measured}):
        lat = [r[3] for r in measured if r[1] == kind and r[2] == 200]
        p = _percentiles(lat)
        by_kind[kind] = {
            "count": sum(1 for r in measured if r[1] == kind),
            **{k: v for k, v in p.items() if k != "count"},
        }
    window_end = max((r[0] + r[3] / 1e3 for r in ok), default=start + total_s)
    completed_in_window = sum(1 for r in ok if r[0] + r[3] / 1e3 <= start + total_s)
    gen_cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    lags = sorted(r[4] for r in measured)
    return {
        "target_rps": rate,
        "duration_s": duration,
        "warmup_s": warmup,
        "sent": len(measured),
        "offered_rps": round(len(measured) / duration, 1),
        "ok": len(ok),
        # responses (200) scheduled in the measured window that also completed in it, per second
        "achieved_rps": round(completed_in_window / duration, 1),
        "errors": len(measured) - len(ok),
        "statuses": statuses,
        "error_kinds": error_kinds,
        **{k: v for k, v in _percentiles([r[3] for r in ok]).items() if k != "count"},
        "by_kind": by_kind,
        "send_lag_ms": {
            "p50": round(lags[len(lags) // 2], 3) if lags else None,
            "p99": round(lags[int(len(lags) * 0.99) - 1], 3) if lags else None,
            "max": round(lags[-1], 3) if lags else None,
        },
        "generator_cpu_fraction": round(gen_cpu / max(end - start, 1e-9), 3),
        "schedule_finished_late_s": round(sent_at - (start + (n - 1) * interval), 4),
        "drain_s": round(end - sent_at, 3),
        "last_response_after_window_s": round(max(0.0, window_end - (start + total_s)), 3),
        # when the slow and refused requests were sent (seconds into the window): clustered
        # times point at a stall (a pause of the server, a poll, a flush), spread ones at queueing
        "slow": [
            [round(r[0] - start - warmup, 4), round(r[3], 1), r[2], r[1]]
            for r in measured
            if r[2] != 200 or r[3] > spec.get("slow_ms", 20.0)
        ][:2000],
    }


def main() -> None:
    spec = json.loads(sys.stdin.read())
    # The generator stands in for a client on another machine: ahead of the server in the CPU queue,
    # its own scheduling delay does not inflate the latencies it reports (it uses ~0.1-0.2 of a core).
    try:
        os.setpriority(os.PRIO_PROCESS, 0, min(-5, spec.get("server_nice", 0)))
        niced = True
    except (PermissionError, OSError):
        niced = False
    try:
        import uvloop

        out, loop_name = uvloop.run(_generate(spec)), "uvloop"
    except ImportError:
        out, loop_name = asyncio.run(_generate(spec)), "asyncio"
    out["event_loop"] = loop_name
    out["generator_nice"] = os.getpriority(os.PRIO_PROCESS, 0) if niced else None
    sys.stdout.write(json.dumps(out))


def run_loadgen(spec: dict) -> dict:
    """One measurement, in a separate Python process (its own GIL and core)."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.serving.loadgen"],
        input=json.dumps(spec),
        capture_output=True,
        text=True,
        timeout=spec["warmup"] + spec["duration"] + spec["timeout"] + 60,
        cwd=ROOT,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


if __name__ == "__main__":
    main()
