from pipeline.config.tenant import GateConfig
from pipeline.gate import ChampionEvidence, decide

POLICY = GateConfig(tolerance=0.01)


def test_first_release_needs_only_to_beat_popularity():
    d = decide("ndcg@10", 0.20, 0.11, None, POLICY)
    assert d.publish and "no live release" in d.reason
    assert [c.name for c in d.checks] == ["beats_popularity"]


def test_losing_to_popularity_rejects_with_reason():
    d = decide("ndcg@10", 0.10, 0.11, None, POLICY)
    assert not d.publish and "beats_popularity" in d.reason and "0.1000" in d.reason


def test_champion_tolerance_boundary():
    at_edge = ChampionEvidence("r1", "same_holdout", 500, challenger=0.19, champion=0.20)
    assert decide("ndcg@10", 0.19, 0.11, at_edge, POLICY).publish
    below = ChampionEvidence("r1", "same_holdout", 500, challenger=0.1899, champion=0.20)
    d = decide("ndcg@10", 0.1899, 0.11, below, POLICY)
    assert not d.publish and "vs_champion" in d.reason and "r1" in d.reason


def test_popularity_check_can_be_disabled():
    policy = GateConfig(require_beat_popularity=False)
    assert decide("ndcg@10", 0.05, 0.11, None, policy).publish


def test_backfill_note_replaces_champion_comparison():
    d = decide("ndcg@10", 0.2, 0.1, None, POLICY, champion_note="live release r9 covers newer data")
    assert d.publish and "covers newer data" in d.reason
