"""Ranker features for a candidate set: source scores and ranks, user and item statistics, attributes.

Statistics are computed here from the events the candidates were generated from (never from
the features stage's `user_stats` / `item_stats`, which count every event up to the interval
end, the holdout included: a ranker fitted or judged with them would see the answers). They
are the same quantities: the user columns are `ONLINE_USER_FEATURES` (what refresh writes to
Redis as `uf:`), in that order. Windows count back from the newest event of the history, so
the same events give the same features wherever they are computed. Vectorised: bincounts and
gathers, no loop over users, items or candidates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from pipeline.features.tables import ONLINE_USER_FEATURES
from pipeline.models.base import TrainData
from pipeline.twostage.candidates import SECONDS_PER_DAY, Candidates

ITEM_COLUMNS = ("item_users", "item_events_7d", "item_events_30d", "item_days_since_last", "item_age_days", "trend")
USER_COLUMNS = tuple(f"user_{c}" for c in ONLINE_USER_FEATURES)
PAIR_COLUMNS = ("n_sources", "category_share", "item_events_7d_at_user", "item_events_30d_at_user")
WINDOWS_DAYS = (7, 30)


@dataclass(frozen=True)
class Stats:
    """Per-user and per-item statistics of one history, plus what attributes give."""

    user: np.ndarray  # float32 [n_users, len(USER_COLUMNS)]
    item: np.ndarray  # float32 [n_items, len(ITEM_COLUMNS)]
    user_category: sp.csr_matrix | None  # share of each user's events per item category
    item_category: np.ndarray | None  # int64 [n_items], -1 = none
    user_last: np.ndarray  # float64 [n_users]: the user's newest event (epoch seconds), NaN: none
    event_keys: np.ndarray  # int64, sorted: item * SPAN + (timestamp - origin), one per event
    origin: int  # the history's oldest timestamp

    def arrays(self) -> dict[str, np.ndarray]:
        """The tensors a release stores to rebuild these statistics (safetensors, no pickle)."""
        out = {
            "user_stats": self.user,
            "item_stats": self.item,
            "user_last": self.user_last,
            "event_keys": self.event_keys,
            "origin": np.array([self.origin], dtype=np.int64),
        }
        if self.user_category is not None and self.item_category is not None:
            uc = self.user_category
            out |= {
                "user_category_indptr": uc.indptr.astype(np.int64),
                "user_category_indices": uc.indices.astype(np.int64),
                "user_category_data": uc.data.astype(np.float32),
                "item_category": self.item_category.astype(np.int64),
            }
        return out

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> Stats:
        uc, cat = None, a.get("item_category")
        if cat is not None:
            n_cat = int(cat.max()) + 1 if len(cat) and cat.max() >= 0 else 1
            n_users = len(a["user_stats"])
            uc = sp.csr_matrix(
                (a["user_category_data"], a["user_category_indices"], a["user_category_indptr"]), shape=(n_users, n_cat)
            )
        return cls(a["user_stats"], a["item_stats"], uc, cat, a["user_last"], a["event_keys"], int(a["origin"][0]))


def _window_counts(idx: np.ndarray, age: np.ndarray, n: int, days: float) -> np.ndarray:
    return np.bincount(idx[age <= days], minlength=n).astype(np.float64)


def compute(history: TrainData) -> Stats:
    """Statistics of `history` as of its newest event."""
    nu, ni = history.n_users, history.n_items
    u, i, ts = history.user_idx, history.item_idx, history.timestamp.astype(np.float64)
    end = ts.max() if len(ts) else 0.0
    age = (end - ts) / SECONDS_PER_DAY
    n_u = np.bincount(u, minlength=nu).astype(np.float64)
    rated = ~np.isnan(history.rating)
    rating_sum = np.bincount(u[rated], weights=history.rating[rated], minlength=nu)
    rating_n = np.bincount(u[rated], minlength=nu)
    last_u = np.full(nu, np.nan)
    np.fmin.at(last_u, u, age)
    with np.errstate(invalid="ignore", divide="ignore"):
        user = np.column_stack(
            [
                _window_counts(u, age, nu, 7),
                _window_counts(u, age, nu, 30),
                n_u,
                last_u,
                np.where(rating_n > 0, rating_sum / np.maximum(rating_n, 1), np.nan),
            ]
        )
    pairs = np.unique(u.astype(np.int64) * ni + i)
    item_users = np.bincount(pairs % ni, minlength=ni).astype(np.float64)
    last_i, first_i = np.full(ni, np.nan), np.full(ni, np.nan)
    np.fmin.at(last_i, i, age)
    np.fmax.at(first_i, i, age)
    e7, e30 = _window_counts(i, age, ni, 7), _window_counts(i, age, ni, 30)
    item = np.column_stack([item_users, e7, e30, last_i, first_i, (e7 / 7 + 1 / 30) / (e30 / 30 + 1 / 30)])
    uc, cat = None, None
    if history.item_features is not None:
        cat = history.item_features.category.astype(np.int64)
        n_cat = int(cat.max()) + 1 if len(cat) and cat.max() >= 0 else 1
        has = cat[i] >= 0
        uc = sp.csr_matrix((np.ones(int(has.sum())), (u[has], cat[i][has])), shape=(nu, n_cat))
        uc.sum_duplicates()
        uc = sp.csr_matrix(sp.diags(1.0 / np.maximum(n_u, 1.0)) @ uc).astype(np.float32)
    origin = int(history.timestamp.min()) if len(ts) else 0
    user_last = np.full(nu, np.nan)
    np.fmax.at(user_last, u, ts)
    keys = np.sort(i.astype(np.int64) * SPAN + (history.timestamp.astype(np.int64) - origin))
    return Stats(user.astype(np.float32), item.astype(np.float32), uc, cat, user_last, keys, origin)


SPAN = 1 << 40  # seconds a history may span (34,000 years): keys of two items never overlap


def at_user_time(stats: Stats, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """float32 [len, len(WINDOWS_DAYS)]: the item's events in the days up to the user's newest
    event: what was popular when the user was last active, not at the history's end."""
    t = np.nan_to_num(stats.user_last[users] - stats.origin, nan=-1.0).astype(np.int64)
    base = items.astype(np.int64) * SPAN
    upper = np.searchsorted(stats.event_keys, base + t, side="right")
    cols = [
        upper - np.searchsorted(stats.event_keys, base + np.maximum(t - int(d * SECONDS_PER_DAY), 0), side="left")
        for d in WINDOWS_DAYS
    ]
    return np.column_stack(cols).astype(np.float32)


def names(source_names: tuple[str, ...]) -> list[str]:
    """Column names of `matrix`, in order."""
    per_source = [f"{s}_{what}" for s in source_names for what in ("score", "rank")]
    return per_source + list(PAIR_COLUMNS) + list(USER_COLUMNS) + list(ITEM_COLUMNS)


def matrix(cands: Candidates, users: np.ndarray, stats: Stats, user_stats: np.ndarray | None = None) -> np.ndarray:
    """float32 [candidates, len(names)]: one row per candidate (user = users[cands.user]).

    `user_stats` [len(users), len(USER_COLUMNS)] overrides the stored user statistics (serving
    passes the online `uf:` features when Redis has them)."""
    u = users[cands.user]
    n_sources = (cands.sources[:, 0::2] == cands.sources[:, 0::2]).sum(axis=1)  # non-NaN scores
    share = np.full(len(u), np.nan, dtype=np.float32)
    if stats.user_category is not None and stats.item_category is not None:
        c = stats.item_category[cands.item]
        ok = c >= 0
        share[ok] = np.asarray(stats.user_category[u[ok], c[ok]]).ravel()
    per_user = stats.user[u] if user_stats is None else user_stats[cands.user]
    windows = at_user_time(stats, u, cands.item)
    return np.column_stack(
        [cands.sources, n_sources.astype(np.float32), share, windows, per_user, stats.item[cands.item]]
    ).astype(np.float32)
