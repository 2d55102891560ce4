"""What one stage cost: CPU seconds, wall seconds and peak resident memory, measured by run_stage.

* `cpu_s`: `time.process_time()` (user + system, every thread of the process) plus the CPU
  of child processes the stage waited for (`getrusage(RUSAGE_CHILDREN)`), over the stage.
* `wall_s`: `time.perf_counter()` over the stage.
* `peak_rss_mb`: the largest resident set of the process WHILE the stage ran. `ru_maxrss` is a
  process high-water mark: in a process that ran a bigger stage before (`python -m pipeline
  run`, a benchmark), it would report that stage's peak for every later one. On Linux the
  mark is reset at the start of each stage (`echo 5 > /proc/self/clear_refs`, which resets
  VmHWM to the current RSS) and VmHWM is read at the end: the kernel's exact peak, no
  sampling. Where that file cannot be written, a thread samples VmRSS every 10 ms and the
  peak is the largest sample (short spikes between samples are missed), or ru_maxrss when the
  stage raised the process's mark. `peak_rss_source` says which (`vmhwm`, `sampled`, `ru_maxrss`).
  The peak includes what the process already held when the stage started (in an Airflow
  task, the interpreter and imports; in one process, earlier stages' leftovers).

Resetting VmHWM also lowers what `ru_maxrss` reports afterwards, so the process's own peak
over every stage is kept here: `process_peak_rss_mb()`.
"""

from __future__ import annotations

import resource
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

_PROC = Path("/proc/self")
_process_peak_kb = 0  # the largest VmHWM seen before a reset (the process peak survives resets)


def _status_kb(field: str) -> int | None:
    try:
        for line in (_PROC / "status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _maxrss_kb() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # kB on Linux


def _reset_hwm() -> bool:
    """Reset the process's VmHWM to its current RSS; False where the kernel does not allow it."""
    global _process_peak_kb
    before = _status_kb("VmHWM")
    if before is None:
        return False
    try:
        (_PROC / "clear_refs").write_text("5")
    except OSError:
        return False
    _process_peak_kb = max(_process_peak_kb, before)
    after = _status_kb("VmHWM")
    return after is not None and after <= before


def process_peak_rss_mb() -> float:
    """The process's peak RSS so far in MB, across the resets the stages made."""
    return round(max(_process_peak_kb, _status_kb("VmHWM") or 0, _maxrss_kb()) / 1024, 1)


class _Sampler(threading.Thread):
    def __init__(self, every: float = 0.01) -> None:
        super().__init__(name="stage-rss-sampler", daemon=True)
        self.every, self.peak_kb, self._stop_event = every, _status_kb("VmRSS") or 0, threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.every):
            self.peak_kb = max(self.peak_kb, _status_kb("VmRSS") or 0)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return max(self.peak_kb, _status_kb("VmRSS") or 0)


@contextmanager
def measure() -> Iterator[dict[str, Any]]:
    """Measure the block; the dict yielded is filled in when the block ends (also on error)."""
    cost: dict[str, Any] = {}
    exact = _reset_hwm()
    sampler = None
    if not exact:
        sampler = _Sampler()
        sampler.start()
    rss_before = _maxrss_kb()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    try:
        yield cost
    finally:
        wall = time.perf_counter() - wall0
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = time.process_time() - cpu0 + (kids.ru_utime - children.ru_utime) + (kids.ru_stime - children.ru_stime)
        if exact:
            peak_kb, source = _status_kb("VmHWM") or 0, "vmhwm"
        else:
            assert sampler is not None
            peak_kb, source = sampler.stop(), "sampled"
            if _maxrss_kb() > rss_before:  # the stage set a new process high: the kernel's figure
                peak_kb, source = _maxrss_kb(), "ru_maxrss"
        cost.update(
            cpu_s=round(cpu, 3), wall_s=round(wall, 3), peak_rss_mb=round(peak_kb / 1024, 1), peak_rss_source=source
        )
