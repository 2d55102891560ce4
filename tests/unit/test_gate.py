import json

import numpy as np
import pytest
import scipy.sparse as sp

from pipeline.config.tenant import GateConfig
from pipeline.evaluation import metrics
from pipeline.gate.policy import ChallengerEvidence, ChampionEvidence, GroupRecall, decide, format_table

POLICY = GateConfig(tolerance=0.01)


def challenger(value=0.20, popularity=0.11, coverage=0.40, popularity_coverage=0.05) -> ChallengerEvidence:
    return ChallengerEvidence("ndcg@10", value, popularity, coverage, popularity_coverage, users=500)


def paired(diffs, coverage=(0.40, 0.40), cold=None, long_tail=None) -> ChampionEvidence:
    diffs = np.asarray(diffs, dtype=np.float64)
    return ChampionEvidence(
        "r1",
        "same_holdout",
        len(diffs),
        challenger=0.2 + float(diffs.mean()),
        champion=0.2,
        diffs=diffs,
        challenger_coverage=coverage[0],
        champion_coverage=coverage[1],
        cold=cold or GroupRecall(100, 0.10, 0.10),
        long_tail=long_tail or GroupRecall(100, 0.05, 0.05),
    )


def names(d):
    return {c.name: c for c in d.checks}


# --- statistics --------------------------------------------------------------------------


def test_bootstrap_of_a_constant_is_that_constant():
    mean, low, high = metrics.bootstrap_mean_ci(np.full(7, 0.25), resamples=200, seed=3)
    assert mean == low == high == pytest.approx(0.25)


def test_bootstrap_two_values_hand_computed():
    # resampled means of {0, 1} (n=2) are 0, 0.5, 1 with probability 1/4, 1/2, 1/4: the 2.5% and
    # 97.5% quantiles are 0 and 1 (each end has ~25% of the mass, far more than 2.5%)
    mean, low, high = metrics.bootstrap_mean_ci(np.array([0.0, 1.0]), resamples=1000, confidence=0.95, seed=0)
    assert (mean, low, high) == (0.5, 0.0, 1.0)
    # a 40% interval sits strictly inside: quantiles 0.3 and 0.7 both fall on the 0.5 mass
    assert metrics.bootstrap_mean_ci(np.array([0.0, 1.0]), resamples=1000, confidence=0.4, seed=0)[1:] == (0.5, 0.5)


def test_bootstrap_is_seeded_and_chunking_does_not_change_it():
    x = np.random.default_rng(1).normal(0.01, 0.2, 300)
    once = metrics.bootstrap_mean_ci(x, resamples=1000, seed=7)
    assert metrics.bootstrap_mean_ci(x, resamples=1000, seed=7) == once
    # 1000 resamples in chunks of 3 rows (max_cells=1000 // 300) draw the same index stream
    assert metrics.bootstrap_mean_ci(x, resamples=1000, seed=7, max_cells=1000) == pytest.approx(once)
    assert metrics.bootstrap_mean_ci(x, resamples=1000, seed=8) != once
    mean, low, high = once
    assert low < mean < high and mean == pytest.approx(x.mean())


def test_bootstrap_empty_is_nan():
    assert all(np.isnan(v) for v in metrics.bootstrap_mean_ci(np.array([])))


def test_item_groups_hand_computed():
    users_per_item = np.array([9, 0, 5, 5, 1, 7, 2, 0, 3, 4])
    # head = ceil(0.2 * 10) = 2 most popular: items 0 (9) and 5 (7)
    assert np.flatnonzero(~metrics.long_tail_items(users_per_item, 0.2)).tolist() == [0, 5]
    # ties at the head boundary go to the lower item index, like the popularity baseline
    assert np.flatnonzero(~metrics.long_tail_items(users_per_item, 0.3)).tolist() == [0, 2, 5]
    assert np.flatnonzero(metrics.cold_items(users_per_item, 3)).tolist() == [1, 4, 6, 7]


def test_group_recall_is_pooled_over_relevant_pairs():
    # two users; relevant: u0 -> {1, 2}, u1 -> {2, 3, 4}; group = {2, 3}
    relevant = sp.csr_matrix(np.array([[0, 1, 1, 0, 0], [0, 0, 1, 1, 1]], dtype=np.float32))
    top = np.array([[2, 0], [4, 3]])
    hits = metrics.hits_matrix(top, np.array([0, 1]), relevant)
    group = np.array([False, False, True, True, False])
    # group pairs: (u0, 2), (u1, 2), (u1, 3) -> 3; found: (u0, 2), (u1, 3) -> 2
    assert metrics.group_recall(hits, top, relevant, group) == (pytest.approx(2 / 3), 3)
    assert np.isnan(metrics.group_recall(hits, top, relevant, np.zeros(5, bool))[0])
    # -1 slots (fewer allowed items than K) never count
    top_short = np.array([[2, -1], [-1, -1]])
    hits_short = metrics.hits_matrix(top_short, np.array([0, 1]), relevant)
    assert metrics.group_recall(hits_short, top_short, relevant, group)[0] == pytest.approx(1 / 3)


# --- decide: without a live release --------------------------------------------------------


def test_first_release_needs_to_beat_popularity_and_keep_coverage():
    d = decide(challenger(), None, POLICY)
    assert d.publish and "no live release" in d.reason
    assert [c.name for c in d.checks] == ["beats_popularity", "coverage"]
    cov = names(d)["coverage"]
    assert cov.value == 0.40 and cov.threshold == 0.05  # popularity's coverage is the floor


def test_losing_to_popularity_rejects_with_reason():
    d = decide(challenger(value=0.10), None, POLICY)
    assert not d.publish and "beats_popularity" in d.reason and "0.1000" in d.reason


def test_coverage_below_popularity_or_absolute_floor_rejects():
    d = decide(challenger(coverage=0.04), None, POLICY)
    assert not d.publish and names(d)["coverage"].status == "FAIL" and "coverage" in d.reason
    strict = GateConfig(min_coverage=0.5)
    d = decide(challenger(coverage=0.40), None, strict)
    assert not d.publish and names(d)["coverage"].threshold == 0.5


def test_popularity_check_can_be_disabled():
    policy = GateConfig(require_beat_popularity=False)
    assert decide(challenger(value=0.05), None, policy).publish


def test_backfill_note_replaces_champion_comparison():
    d = decide(challenger(), None, POLICY, champion_note="live release r9 covers newer data")
    assert d.publish and "covers newer data" in d.reason


# --- decide: against the live release ----------------------------------------------------


def test_equal_models_pass_with_a_zero_width_interval():
    d = decide(challenger(), paired(np.zeros(200)), POLICY)
    assert d.publish, d.reason
    assert d.ci == {
        "metric": "ndcg@10",
        "mean_diff": 0.0,
        "low": 0.0,
        "high": 0.0,
        "confidence": 0.95,
        "resamples": 1000,
        "seed": 0,
        "users": 200,
    }
    assert [c.status for c in d.checks] == ["PASS"] * 5


def test_positive_mean_but_lower_bound_below_tolerance_rejects():
    diffs = np.array([0.5, -0.4] * 10)  # mean +0.05, but the spread leaves the lower bound near -0.15
    d = decide(challenger(), paired(diffs), POLICY)
    check = names(d)["vs_champion"]
    assert d.ci["mean_diff"] == pytest.approx(0.05) and d.ci["low"] < -POLICY.tolerance < 0 < d.ci["mean_diff"]
    assert not d.publish and check.status == "FAIL" and check.value == d.ci["low"] and check.threshold == -0.01
    assert "vs_champion" in d.reason and "r1" in d.reason and "CI" in d.reason
    # a looser tolerance accepts the same evidence; the decision is a pure function of it
    assert decide(challenger(), paired(diffs), GateConfig(tolerance=0.5)).publish
    assert decide(challenger(), paired(diffs), POLICY) == d


def test_lower_bound_exactly_at_minus_tolerance_passes():
    d = decide(challenger(), paired(np.full(60, -0.01)), POLICY)
    assert d.publish and names(d)["vs_champion"].value == pytest.approx(-0.01)
    d = decide(challenger(), paired(np.full(60, -0.0101)), POLICY)
    assert not d.publish


def test_recorded_basis_is_a_point_comparison_without_guardrails():
    def recorded(ch: float) -> ChampionEvidence:
        return ChampionEvidence(
            "r1", "recorded (only 3 users with events after its cutoff)", 500, ch, 0.20, None, 0.4, 0.4
        )

    assert decide(challenger(), recorded(0.19), POLICY).publish  # at the tolerance edge
    d = decide(challenger(), recorded(0.1899), POLICY)
    assert not d.publish and "vs_champion" in d.reason and "r1" in d.reason and "point comparison" in d.reason
    assert d.ci is None
    ok = decide(challenger(), recorded(0.2), POLICY)
    assert names(ok)["cold_item_recall"].skipped and names(ok)["long_tail_recall"].skipped
    assert "recorded" in names(ok)["cold_item_recall"].detail


def test_coverage_collapse_against_the_champion_rejects():
    d = decide(challenger(), paired(np.zeros(100), coverage=(0.19, 0.40)), POLICY)
    cov = names(d)["coverage"]
    assert not d.publish and cov.status == "FAIL" and cov.threshold == pytest.approx(0.20)
    assert decide(challenger(), paired(np.zeros(100), coverage=(0.20, 0.40)), POLICY).publish


def test_cold_item_guardrail_fails_beyond_the_allowed_drop():
    ok = paired(np.zeros(100), cold=GroupRecall(80, 0.28, 0.30))  # drop 0.02: allowed
    assert decide(challenger(), ok, POLICY).publish
    bad = paired(np.zeros(100), cold=GroupRecall(80, 0.27, 0.30))  # drop 0.03
    d = decide(challenger(), bad, POLICY)
    c = names(d)["cold_item_recall"]
    assert not d.publish and c.status == "FAIL" and c.value == 0.27 and c.threshold == pytest.approx(0.28)
    assert d.reason.startswith("rejected: cold_item_recall")


def test_long_tail_guardrail_fails_and_is_configurable():
    ev = paired(np.zeros(100), long_tail=GroupRecall(300, 0.10, 0.15))
    d = decide(challenger(), ev, POLICY)
    assert not d.publish and names(d)["long_tail_recall"].status == "FAIL"
    assert decide(challenger(), ev, GateConfig(max_long_tail_recall_drop=0.05)).publish


def test_guardrail_skipped_when_too_few_relevant_pairs():
    ev = paired(np.zeros(100), cold=GroupRecall(5, 0.0, 0.8), long_tail=GroupRecall(0, float("nan"), float("nan")))
    d = decide(challenger(), ev, POLICY)
    assert d.publish
    cold, tail = names(d)["cold_item_recall"], names(d)["long_tail_recall"]
    assert cold.skipped and cold.status == "SKIP" and "not enough data: 5 relevant cold-item pairs" in cold.detail
    assert tail.skipped and tail.value is None


def test_decision_is_json_and_table_has_one_line_per_check():
    d = decide(challenger(), paired(np.array([0.5, -0.4] * 10)), POLICY)
    doc = json.loads(json.dumps(d.to_dict()))
    assert [c["status"] for c in doc["checks"]] == ["PASS", "FAIL", "PASS", "PASS", "PASS"]
    lines = format_table(d).splitlines()
    assert len(lines) == 1 + len(d.checks)
    assert lines[2].split()[:4] == ["FAIL", "vs_champion", f"{d.ci['low']:.4f}", "-0.0100"]
