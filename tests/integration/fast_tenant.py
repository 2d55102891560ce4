"""A tenant whose run takes seconds: for tests about processes and stores, not model quality."""

# a 2-iteration ALS, and a gate that always publishes: these tests are about processes, not quality
GATE_OPEN = {
    "require_beat_popularity": False,
    "tolerance": 1.0,
    "min_coverage_ratio": 0.0,
    "max_cold_recall_drop": 1.0,
    "max_long_tail_recall_drop": 1.0,
}
FAST = {"model": {"factors": 4, "iterations": 2}, "gate": GATE_OPEN}
