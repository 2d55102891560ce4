"""Fixtures shared by the model tests."""

import numpy as np
import pandas as pd
import pytest

from pipeline.features import dataset
from pipeline.models import TrainData
from pipeline.samples import synthetic


@pytest.fixture(scope="module")
def split():
    """(Features, TrainData) of a small synthetic tenant with a per-user temporal 80/20 holdout."""
    df = synthetic.interactions(n_users=300, n_items=150, mean_events=20, seed=3)
    u, _ = pd.factorize(df["user_id"], sort=True)
    i, _ = pd.factorize(df["item_id"], sort=True)
    ts = pd.to_datetime(df["timestamp"], unit="s", utc=True)
    hold = dataset.temporal_holdout(u, df["timestamp"].to_numpy(), i, 0.2)
    events = pd.DataFrame(
        {
            "user_idx": u.astype(np.int32),
            "item_idx": i.astype(np.int32),
            "timestamp": ts,
            "rating": df["rating"],
            "holdout": hold,
        }
    )
    feats = dataset.Features(
        users=pd.DataFrame({"user_idx": np.arange(u.max() + 1)}),
        items=pd.DataFrame({"item_idx": np.arange(i.max() + 1)}),
        events=events,
    )
    return feats, TrainData.from_events(feats.split(False), feats.n_users, feats.n_items)
