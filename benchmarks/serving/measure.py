"""One measured window at a fixed rate (with the CPU every party used meanwhile), and the
search for the highest rate that still meets the p99 target."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from benchmarks.serving.loadgen import run_loadgen
from benchmarks.serving.report import DISTURBED_CORES, fmt_row, passes
from benchmarks.serving.server import Server, settle


def redis_cpu_seconds(redis_url: str) -> float | None:
    try:
        from pipeline.storage.redis import redis_client

        r = redis_client(redis_url)
        try:
            info = r.info("cpu")
        finally:
            r.close()
        return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])
    except Exception:
        return None


def machine_cpu_seconds() -> dict[str, float] | None:
    """Machine-wide CPU seconds so far (/proc/stat via psutil): normal-priority busy, niced, stolen."""
    try:
        import psutil

        t = psutil.cpu_times()
        return {
            "busy": t.user + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0),
            "nice": t.nice,  # processes with a positive nice value (they yield to the server)
            "steal": getattr(t, "steal", 0.0),
        }
    except ImportError:
        return None


def cpu_pressure() -> float | None:
    """Linux PSI: share of the last 10 s in which some runnable task waited for a CPU (%)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/pressure/cpu").read_text().splitlines():
            if line.startswith("some"):
                return float(line.split()[1].split("=")[1])
    return None


def measure(server: Server, base_spec: dict, rate: float, duration: float, warmup: float, redis_url: str) -> dict:
    spec = {**base_spec, "rate": rate, "duration": duration, "warmup": warmup}
    s0, r0, m0, t0 = server.cpu_seconds(), redis_cpu_seconds(redis_url), machine_cpu_seconds(), time.perf_counter()
    res = run_loadgen(spec)
    s1, r1, m1, t1 = server.cpu_seconds(), redis_cpu_seconds(redis_url), machine_cpu_seconds(), time.perf_counter()
    # process start-up of the generator is inside t1 - t0 (~0.3 s): good enough for a ratio
    wall = t1 - t0

    def cores(a, b):
        return round((b - a) / wall, 2) if a is not None and b is not None else None

    res["server_cpu_cores"] = cores(s0, s1)
    res["redis_cpu_cores"] = cores(r0, r1)
    if m0 is not None and m1 is not None:
        busy = cores(m0["busy"], m1["busy"])
        res["machine_busy_cores"] = busy
        res["steal_cores"] = cores(m0["steal"], m1["steal"])
        res["other_niced_cpu_cores"] = cores(m0["nice"], m1["nice"])
        if res["server_cpu_cores"] is not None and res["redis_cpu_cores"] is not None:
            # everything else at normal priority on the box meanwhile: it competes with the server
            ours = res["server_cpu_cores"] + res["redis_cpu_cores"] + res["generator_cpu_fraction"]
            res["other_processes_cpu_cores"] = round(max(0.0, busy - ours), 2)
        other = (res.get("other_processes_cpu_cores") or 0.0) + (res["other_niced_cpu_cores"] or 0.0)
        res["disturbed"] = other + (res["steal_cores"] or 0.0) > DISTURBED_CORES
    res["loadavg_1m_after"] = round(os.getloadavg()[0], 2)
    res["cpu_pressure_some_avg10_after"] = cpu_pressure()
    res["passes_p99_target"] = passes(res, base_spec["p99_target_ms"])
    settle(server)
    return res


def find_max_rate(server, base_spec, fixed, steps, search_duration, warmup, redis_url):
    """Bisect between the highest passing and the lowest failing fixed rate (10 req/s resolution)."""
    ok = [r for r in fixed if r["passes_p99_target"]]
    bad = [r for r in fixed if not r["passes_p99_target"]]
    best = max(ok, key=lambda r: r["target_rps"]) if ok else None
    lo = best["target_rps"] if best else 0.0
    hi = min((r["target_rps"] for r in bad if r["target_rps"] > lo), default=None)
    search = []

    def probe(rate: float) -> None:
        nonlocal lo, hi, best
        res = measure(server, {**base_spec, "seed": 1000 + len(search)}, rate, search_duration, warmup, redis_url)
        search.append(res)
        print(fmt_row(res) + "   (search)", flush=True)
        if res["passes_p99_target"]:
            lo, best = rate, res
        else:
            hi = rate

    while hi is None and len(search) < steps:  # everything passed: go up until something fails
        probe(lo * 2 if lo else 100.0)
    while hi is not None and len(search) < steps and hi - lo > 10:
        rate = round((lo + hi) / 2 / 10) * 10
        if rate <= lo or rate >= hi:
            break
        probe(rate)
    return best, search
