"""User and item feature tables: hand-computed windows, recency, trend and catalog attributes."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pytest

from pipeline.features import tables as ft

AS_OF = datetime(2025, 4, 1, tzinfo=UTC)


def _events():
    t = lambda days: pd.Timestamp(AS_OF) - pd.Timedelta(days=days)  # noqa: E731
    return pd.DataFrame(
        {
            "user_id": ["a", "a", "a", "b", "b"],
            "item_id": ["x", "y", "x", "x", "z"],
            "timestamp": pd.to_datetime([t(1), t(10), t(40), t(3), t(5)], utc=True),
            "rating": [5.0, 3.0, np.nan, np.nan, np.nan],
        }
    )


CATALOG = pd.DataFrame(
    {
        "item_id": ["x", "y", "z", "new"],
        "category": ["c1", "c2", "c1", "c3"],
        "tags": [["t1", "t2"], None, ["t1"], ["t9"]],
    }
)


def test_user_features_by_hand():
    users = ft.user_features(_events(), AS_OF, CATALOG).set_index("user_id")
    assert users.loc["a"].to_dict() == {
        "events_7d": 1,
        "events_30d": 2,
        "events_total": 3,
        "days_since_last": 1.0,
        "avg_rating": 4.0,
        "distinct_categories": 2,
    }
    assert users.loc["b", "events_7d"] == 2 and users.loc["b", "days_since_last"] == 3.0
    assert np.isnan(users.loc["b", "avg_rating"]) and users.loc["b", "distinct_categories"] == 1
    vec = ft.online_user_vectors(users.reset_index())
    assert vec.dtype == np.float32 and vec.shape == (2, len(ft.ONLINE_USER_FEATURES))


def test_item_features_by_hand_with_cold_catalog_items():
    items = ft.item_features(_events(), AS_OF, CATALOG).set_index("item_id")
    assert list(items.index) == ["new", "x", "y", "z"]
    x = items.loc["x"]
    assert (x["users"], x["events_7d"], x["events_30d"], x["age_days"]) == (2, 2, 2, 40.0)
    assert x["trend"] == pytest.approx((2 / 7 + 1 / 30) / (2 / 30 + 1 / 30))
    assert x["category"] == "c1" and x["tag_count"] == 2
    assert items.loc["y", "tag_count"] == 0 and items.loc["y", "trend"] < 1  # only an old event
    new = items.loc["new"]
    assert (new["users"], new["events_30d"], new["trend"]) == (0, 0, 1.0) and np.isnan(new["age_days"])


def test_tables_do_not_depend_on_the_wall_clock_or_row_order():
    ev = _events()
    a = ft.user_features(ev, AS_OF, CATALOG)
    b = ft.user_features(ev.sample(frac=1, random_state=3), AS_OF, CATALOG)
    pd.testing.assert_frame_equal(a, b)
    pd.testing.assert_frame_equal(ft.item_features(ev, AS_OF), ft.item_features(ev.iloc[::-1], AS_OF))
