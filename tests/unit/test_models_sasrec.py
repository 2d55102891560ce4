"""SASRec: its sequences, windows, the numpy encoder serving runs, and that it learns order.

The planted data: N_ITEMS items on one cycle, next(i) = (i + STEP) % N_ITEMS; every user walks
WALK consecutive steps of it from a random start. What follows an item is fixed by that item
alone, and only a model that reads the order (not the bag of items) can tell which of a
user's items is the one to continue from.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.config.models import SASRecConfig
from pipeline.models import TrainData, build_by_kind, registry
from pipeline.models.sasrec import SASRec, latest, windows
from pipeline.models.sequence import SequenceEncoder, chronological
from pipeline.samples import synthetic

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: threads only add contention

N_ITEMS, STEP, USERS, WALK = 24, 5, 120, 6


def nxt(i: int) -> int:
    return (i + STEP) % N_ITEMS


def _walks() -> TrainData:
    rng = np.random.default_rng(0)
    start = rng.integers(0, N_ITEMS, USERS)
    items = (start[:, None] + STEP * np.arange(WALK)[None, :]) % N_ITEMS
    user = np.repeat(np.arange(USERS), WALK)
    stamps = 1_700_000_000 + np.tile(np.arange(WALK), USERS) * 60
    return TrainData(USERS, N_ITEMS, user, items.ravel(), stamps, np.full(USERS * WALK, np.nan))


def _cfg(**kw) -> SASRecConfig:
    return SASRecConfig(**{"dim": 16, "max_len": 8, "epochs": 40, "batch_size": 32, "learning_rate": 0.01, **kw})


@pytest.fixture(scope="module")
def fitted() -> SASRec:
    return SASRec(_cfg(), torch.device("cpu")).fit(_walks())


def test_sequences_are_the_release_seen_lists_reversed():
    # user 0: item 3 at t=10, item 1 at t=20, item 3 again at t=30, items 2 and 4 both at t=25
    # -> last events: 1@20, 2@25, 4@25, 3@30; the release (newest first, ties by lower item) lists
    # 3, 2, 4, 1, so oldest first is 1, 4, 2, 3. User 1 has nothing; user 2 one item.
    data = TrainData(
        3, 5, np.array([0, 0, 0, 0, 0, 2]), np.array([3, 1, 3, 2, 4, 0]),
        np.array([10, 20, 30, 25, 25, 5]), np.full(6, np.nan),
    )  # fmt: skip
    indptr, items = chronological(data)
    assert indptr.tolist() == [0, 4, 4, 5] and items.tolist() == [1, 4, 2, 3, 0]
    ev = pd.DataFrame({"user_idx": data.user_idx, "item_idx": data.item_idx, "timestamp": data.timestamp})
    last = ev.groupby(["user_idx", "item_idx"])["timestamp"].max().reset_index()
    release_order = last.sort_values(["user_idx", "timestamp", "item_idx"], ascending=[True, False, True])
    assert release_order[release_order.user_idx == 0]["item_idx"].tolist() == [3, 2, 4, 1]


def test_windows_cut_from_the_end_and_overlap_by_one():
    # one user with items 0..6 (7 items), windows of 3 inputs + 1: [3..6], [0..3]; pad = 9
    got = windows(np.array([0, 7, 8]), np.arange(8), 3, pad=9)
    assert got.tolist() == [[3, 4, 5, 6], [0, 1, 2, 3]]  # the second user's single item: no target, no window
    assert latest(np.array([0, 7, 8]), np.arange(8), 3, pad=9).tolist() == [[4, 5, 6], [9, 9, 7]]


@pytest.mark.parametrize("heads", [1, 2])
def test_numpy_encoder_is_the_trained_encoder(heads):
    data = _walks()
    model = SASRec(_cfg(epochs=2, heads=heads), torch.device("cpu")).fit(data)
    encoder = SequenceEncoder.from_state(model.state(), heads)
    indptr, items = chronological(data)
    for u in range(0, USERS, 7):
        seen_newest_first = items[indptr[u] : indptr[u + 1]][::-1]
        np.testing.assert_allclose(encoder.encode(seen_newest_first), model.user_vectors()[u], atol=2e-5)
    long = np.arange(N_ITEMS)  # longer than max_len: only the newest max_len items count
    np.testing.assert_array_equal(encoder.encode(long), encoder.encode(long[:8]))
    assert not encoder.encode(np.empty(0, dtype=np.int64)).any()


def test_learns_the_planted_next_item_from_the_newest_item(fitted):
    encoder = SequenceEncoder.from_state(fitted.state(), 1)
    V = fitted.item_vectors()

    def top(history: list[int]) -> int:
        scores = V @ encoder.encode(np.array(history))
        scores[history] = -np.inf
        return int(np.argmax(scores))

    assert np.mean([top([i]) == nxt(i) for i in range(N_ITEMS)]) >= 0.9
    # the same two items in the other order: the newest one decides what comes next
    a, b = 0, 11
    assert top([b, a]) == nxt(b) and top([a, b]) == nxt(a)


def test_same_seed_same_model_and_seed_matters(fitted):
    again = SASRec(_cfg(), torch.device("cpu")).fit(_walks())
    for name, value in fitted.state().items():
        np.testing.assert_array_equal(value, again.state()[name], err_msg=name)
    other = SASRec(_cfg(seed=7), torch.device("cpu")).fit(_walks())
    assert not np.array_equal(other.item_vectors(), fitted.item_vectors())


def test_sampled_negatives_train_too():
    losses: list[float] = []
    model = SASRec(_cfg(negatives=6), torch.device("cpu")).fit(_walks(), lambda e, m: losses.append(m["loss"]))
    assert np.isfinite(losses).all() and losses[-1] < 0.5 * losses[0]
    V, U = model.item_vectors(), model.user_vectors()
    assert np.isfinite(U).all() and U.shape == (USERS, 16) and V.shape == (N_ITEMS, 16)


def test_registered_with_its_config_and_serving_fold_in():
    assert registry.fold_in("sasrec") == "sequence" and registry.scoring("sasrec") == "dot"
    model = build_by_kind("sasrec", {"dim": 8, "heads": 2})
    assert isinstance(model, SASRec) and model.config.heads == 2
    with pytest.raises(ValueError, match="must divide dim"):
        SASRecConfig(dim=10, heads=3)


def test_synthetic_sequential_structure_is_planted_and_off_by_default():
    plain = synthetic.interactions(n_users=50, n_items=40, seed=2)
    assert plain.equals(synthetic.interactions(n_users=50, n_items=40, seed=2, sequential=0.0))
    df = synthetic.interactions(n_users=200, n_items=40, seed=2, sequential=0.8)
    assert not df.duplicated(["user_id", "item_id"]).any()
    ordered = df.sort_values(["user_id", "timestamp"], kind="stable")
    pairs = pd.DataFrame({"a": ordered["item_id"].to_numpy()[:-1], "b": ordered["item_id"].to_numpy()[1:]})
    pairs = pairs[(ordered["user_id"].to_numpy()[:-1] == ordered["user_id"].to_numpy()[1:])]
    # the commonest follower of each item follows it most of the time (taste draws alone: rarely)
    share = pairs.groupby("a")["b"].agg(lambda s: s.value_counts().iloc[0] / len(s)).mean()
    assert share > 0.5
    with pytest.raises(ValueError, match="probability"):
        synthetic.interactions(sequential=1.5)
