"""Team-draft interleaving: fair picks, no repeats, reproducible from the seed."""

from __future__ import annotations

import numpy as np

from pipeline.experiments.interleave import team_draft


def test_teams_alternate_fairly_and_items_are_distinct():
    a, b = list("abcdefgh"), list("bxaycz")
    merged = team_draft(a, b, 8, seed=1)
    items = [(a, b)[t][i] for t, i in merged]
    assert len(items) == len(set(items)) == 8
    teams = [t for t, _ in merged]
    for n in range(2, 9, 2):  # after every pair of rounds the teams have equal picks while both can pick
        assert abs(teams[:n].count(0) - teams[:n].count(1)) <= 1
    assert team_draft(a, b, 8, seed=1) == merged


def test_each_team_contributes_its_best_remaining_item():
    a, b = ["x", "y", "z"], ["x", "w", "v"]
    merged = team_draft(a, b, 4, seed=7)
    first_team, first_idx = merged[0]
    assert first_idx == 0  # the first pick is that team's top item "x"
    other = 1 - first_team
    assert merged[1] == (other, 1)  # "x" is taken, so the other team adds its next best


def test_coin_is_unbiased_over_seeds():
    firsts = [team_draft([1, 2], [3, 4], 2, seed=s)[0][0] for s in range(4000)]
    assert abs(np.mean(firsts) - 0.5) < 0.03


def test_one_exhausted_list_lets_the_other_fill():
    assert team_draft([1], [2, 3, 4], 4, seed=0) in ([(0, 0), (1, 0), (1, 1), (1, 2)], [(1, 0), (0, 0), (1, 1), (1, 2)])
