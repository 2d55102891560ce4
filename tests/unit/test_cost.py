"""Stage cost measurement (pipeline/ops/cost.py): per-stage peaks, not the process's high-water mark."""

from __future__ import annotations

import time

import numpy as np

from pipeline.ops import cost


def _touch(mb: int) -> np.ndarray:
    return np.ones(mb * 1024 * 1024 // 8)  # np.ones writes every page: resident at once


def test_measure_records_cpu_wall_and_the_blocks_own_peak():
    with cost.measure() as big:
        block = _touch(300)
        del block
    with cost.measure() as small:  # after a 300 MB stage: its peak must not carry over
        end = time.process_time() + 0.2
        while time.process_time() < end:  # ~0.2 s of CPU
            pass
    with cost.measure() as idle:
        time.sleep(0.2)
    assert big["peak_rss_source"] == "vmhwm"  # Linux: the exact, resettable VmHWM
    assert big["peak_rss_mb"] >= small["peak_rss_mb"] + 250
    assert 0.18 <= small["cpu_s"] <= 0.5 and small["wall_s"] >= small["cpu_s"] * 0.9
    assert idle["wall_s"] >= 0.2 and idle["cpu_s"] < 0.1
    assert cost.process_peak_rss_mb() >= big["peak_rss_mb"]  # the process's peak survives the resets


def test_the_sampler_is_the_fallback_where_vmhwm_cannot_be_reset(monkeypatch):
    monkeypatch.setattr(cost, "_reset_hwm", lambda: False)
    base = cost.process_peak_rss_mb()
    with cost.measure() as spent:
        block = _touch(200)
        time.sleep(0.05)  # the sampler sees it (10 ms period)
        del block
    assert spent["peak_rss_source"] in ("sampled", "ru_maxrss")
    assert spent["peak_rss_mb"] >= 150 and spent["peak_rss_mb"] <= base + 400
