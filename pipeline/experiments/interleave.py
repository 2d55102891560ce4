"""Team-draft interleaving (Radlinski et al., 2008): two rankings merged into one list.

Each round the team with fewer picks (a coin flip on a tie) adds its best item not yet in the
list; every item remembers its team, so a click credits the arm that contributed it. Both
arms face the same user at the same moment with the same position bias, which makes it far
more sensitive than an A/B split for ranking changes. The coin is seeded by the response's
`recommendation_id`, so the same response can be rebuilt exactly.
"""

from __future__ import annotations

import random
from collections.abc import Hashable, Sequence


def team_draft(a: Sequence[Hashable], b: Sequence[Hashable], k: int, seed: int) -> list[tuple[int, int]]:
    """The merged list as (team 0|1, index into that team's ranking), at most k long, no repeats."""
    rng = random.Random(seed)
    lists = (a, b)
    out: list[tuple[int, int]] = []
    used: set[Hashable] = set()
    nxt, picks = [0, 0], [0, 0]
    while len(out) < k:  # k <= 100 rounds of one response
        for t in (0, 1):
            while nxt[t] < len(lists[t]) and lists[t][nxt[t]] in used:
                nxt[t] += 1
        open_ = [nxt[t] < len(lists[t]) for t in (0, 1)]
        if not any(open_):
            break
        team = 0 if picks[0] < picks[1] else 1 if picks[1] < picks[0] else int(rng.random() >= 0.5)
        if not open_[team]:
            team = 1 - team
        out.append((team, nxt[team]))
        used.add(lists[team][nxt[team]])
        picks[team] += 1
    return out


def seed_of(recommendation_id: str) -> int:
    return int(recommendation_id[:16], 16) if recommendation_id else 0
