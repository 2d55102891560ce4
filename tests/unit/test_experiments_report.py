"""The report's joins, by hand: outcomes to impressions per user and arm, interleaving credit."""

from __future__ import annotations

import pandas as pd

from pipeline.config.experiments import ExperimentConfig
from pipeline.experiments import report

AB = ExperimentConfig.model_validate({"name": "e", "arms": [{"name": "a", "share": 0.5}, {"name": "b", "share": 0.5}]})
IL = AB.model_copy(update={"interleave": True})


def _imps() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "recommendation_id": ["r1", "r2", "r3"],
            "user_id": ["u1", "u1", "u2"],
            "variant": ["a", "a", "b"],
            "items": [["x", "y", "z"], ["x", "w"], ["p", "q"]],
            "teams": [["a", "b", "a"], ["b", "a"], ["a", "b"]],
        }
    )


def _outcomes() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "recommendation_id": ["r1", "r1", "r2", "r3", "r3", "other"],
            "item_id": ["y", "z", "x", "q", "q", "x"],
            "event_type": ["click", "Click", "purchase", "click", "click", "click"],
            "position": pd.array([1, None, None, 1, 1, 0], dtype="Int64"),
        }
    )


def test_per_user_counts_items_shown_and_attributed_outcomes():
    users, attributed = report.per_user(_imps(), _outcomes(), AB)
    got = users.set_index("user_id")[["arm", "responses", "impressions", "clicks", "conversions"]]
    assert got.loc["u1"].tolist() == ["a", 2, 5, 2, 1]  # two lists (3 + 2 items), 2 clicks (case-insensitive)
    assert got.loc["u2"].tolist() == ["b", 1, 2, 2, 0]
    assert attributed == 5  # the event naming an unknown response is not this experiment's


def test_interleaving_credits_the_team_of_the_clicked_position_or_item():
    credit = report.credit(_imps(), _outcomes(), IL)
    # u1: r1 position 1 (team b), r1 item z (position 2, team a); u2: r3 position 1 twice (team b)
    assert credit.loc["u1"].tolist() == [1, 1] and credit.loc["u2"].tolist() == [0, 2]


def test_a_new_experiment_without_traffic_reports_zeros_not_an_error(tmp_path):
    from datetime import UTC, datetime

    from pipeline.config import TenantConfig
    from pipeline.storage import open_store

    arms = [{"name": "a", "share": 0.5}, {"name": "b", "share": 0.5}]
    cfg = TenantConfig.model_validate(
        {"tenant": "acme", "source": {"uri": "x.csv"},
         "experiments": [{"name": "e", "traffic": 0.5, "arms": arms},
                         {"name": "i", "traffic": 0.5, "interleave": True, "arms": arms}]}
    )  # fmt: skip
    store = open_store(str(tmp_path))
    doc = report.build(store, cfg, "e", datetime(2026, 1, 2, tzinfo=UTC))
    assert [(a["users"], a["ctr"]) for a in doc["arms"]] == [(0, None), (0, None)]
    assert doc["arms"][1]["verdict"] == "not yet significant" and not doc["srm"]["mismatch"]
    assert report.build(store, cfg, "i", datetime(2026, 1, 2, tzinfo=UTC))["interleaving"]["winner"] is None
