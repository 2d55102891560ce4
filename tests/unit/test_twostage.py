"""Two-stage recommendation: candidate sources and their merge, the ranker's features, a ranker
that learns a planted signal the model alone misses, and ranker training that never sees the holdout."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import scipy.sparse as sp

from pipeline.config.models import ALSConfig
from pipeline.config.twostage import RankerConfig, TwoStageConfig
from pipeline.evaluation import scoring
from pipeline.features import dataset
from pipeline.models import TrainData, build, build_by_kind
from pipeline.stages import run_all
from pipeline.twostage import candidates as cg
from pipeline.twostage import features as tf
from pipeline.twostage import model as tsm
from pipeline.twostage.ranker import Ranker

DAY = 86_400


def history(events: list[tuple[int, int, int]], n_users: int, n_items: int) -> TrainData:
    """TrainData from (user, item, day) triples."""
    u, i, d = (np.array(c, dtype=np.int64) for c in zip(*events, strict=True))
    return TrainData(n_users, n_items, u, i, d * DAY, np.full(len(u), np.nan))


def test_merge_unions_sources_and_keeps_each_score_and_rank():
    a = cg.Proposals(np.array([[3, 1], [0, -1]]), np.array([[0.9, 0.5], [0.7, np.nan]], np.float32))
    b = cg.Proposals(np.array([[1, 4, 2], [2, -1, -1]]), np.array([[3.0, 2.0, 1.0], [5.0, np.nan, np.nan]], np.float32))
    c = cg.merge({"a": a, "b": b}, n_items=5)
    assert c.names == ("a", "b")
    assert list(zip(c.user.tolist(), c.item.tolist(), strict=True)) == [(0, 1), (0, 2), (0, 3), (0, 4), (1, 0), (1, 2)]
    expected = [
        [0.5, 2, 3.0, 1],  # item 1: a's 2nd, b's 1st
        [np.nan, 3, 1.0, 3],  # item 2: b only; a's rank is one past its list (2 + 1)
        [0.9, 1, np.nan, 4],
        [np.nan, 3, 2.0, 2],
        [0.7, 1, np.nan, 4],
        [np.nan, 3, 5.0, 1],
    ]
    np.testing.assert_array_equal(c.sources, np.array(expected, np.float32))


def test_seen_lists_are_distinct_items_newest_first():
    h = history([(0, 2, 1), (0, 1, 3), (0, 2, 5), (1, 0, 2), (0, 4, 4)], n_users=3, n_items=5)
    indptr, indices = cg.seen_newest_first(h)
    assert indptr.tolist() == [0, 3, 4, 4]
    assert indices.tolist() == [2, 4, 1, 0]


def test_top_k_per_user_orders_by_score_then_item():
    out = tsm.top_k_per_user(
        np.array([1, 0, 0, 0, 1]), np.array([7, 5, 3, 9, 2]), np.array([0.1, 0.5, 0.5, 0.9, 0.3]), n_users=3, k=2
    )
    assert out.tolist() == [[9, 3], [2, 7], [-1, -1]]


def test_cooccurrence_proposes_neighbours_of_the_latest_items_and_never_seen_ones():
    # items 0-1 co-occur (users 1, 2), items 2-3 co-occur (users 3, 4); user 0 saw 0 long ago, 2 lately
    h = history(
        [(0, 0, 1), (0, 2, 9), (1, 0, 1), (1, 1, 2), (2, 0, 1), (2, 1, 2), (3, 2, 1), (3, 3, 2), (4, 2, 1), (4, 3, 2)],
        n_users=5,
        n_items=4,
    )
    ctx = cg.source_context(h, build_by_kind("popularity").fit(h), recent_items=1, recent_decay=0.5,
                            neighbours=3, segments=1, half_life_days=30.0)  # fmt: skip
    p = cg.SOURCES["cooccurrence"](ctx).propose(np.array([0]), 3)
    assert p.items[0].tolist() == [3, -1, -1]  # only the newest item (2) counts: its unseen neighbour is 3
    assert np.isnan(p.scores[0, 1:]).all()
    wide = cg.source_context(
        h, ctx.model, recent_items=2, recent_decay=0.5, neighbours=3, segments=1, half_life_days=30.0
    )
    p = cg.SOURCES["cooccurrence"](wide).propose(np.array([0]), 3)
    assert p.items[0].tolist() == [3, 1, -1]  # 0's neighbour 1 too, after the newer item's; seen ones never
    np.testing.assert_allclose(p.scores[0, :2], [2 / np.sqrt(6), 0.5 * 2 / np.sqrt(6)], rtol=1e-5)


def test_segment_popularity_is_what_users_like_them_chose():
    # users 0-1 are light (1 event), users 2-3 heavy (3 events); heavy users all chose item 4
    h = history(
        [(0, 0, 5), (1, 0, 5), (2, 4, 5), (2, 1, 5), (2, 2, 5), (3, 4, 5), (3, 1, 4), (3, 3, 5)], n_users=4, n_items=5
    )
    segment, _ = cg.activity_segments(np.array([1, 1, 3, 3]), buckets=2)
    assert segment.tolist() == [0, 0, 1, 1]
    table = cg.segment_table(h, segment, half_life_days=1e9)
    np.testing.assert_allclose(table[0], [1.0, 0, 0, 0, 0])
    np.testing.assert_allclose(table[1], [0, 1.0, 0.5, 0.5, 1.0], rtol=1e-6)
    seen = sp.csr_matrix((np.ones(1, np.float32), ([0], [0])), shape=(4, 5))
    p = cg.SegmentPopularitySource(table, segment, seen).propose(np.array([0, 2]), 2)
    assert p.items.tolist() == [[-1, -1], [1, 4]]  # light user 0 saw the light segment's only item


def test_statistics_and_user_time_windows():
    h = history([(0, 1, 0), (0, 2, 20), (1, 1, 25), (1, 1, 40)], n_users=2, n_items=3)
    st = tf.compute(h)
    # user columns follow ONLINE_USER_FEATURES: events_7d, events_30d, events_total, days_since_last, avg_rating
    np.testing.assert_allclose(st.user[0, :4], [0, 1, 2, 20])
    np.testing.assert_allclose(st.user[1, :4], [1, 2, 2, 0])
    assert np.isnan(st.user[:, 4]).all()
    assert st.item[:, 0].tolist() == [0, 2, 1]  # distinct users per item
    # item 1's events in the 7 / 30 days up to each user's newest event (day 20 for user 0, 40 for user 1)
    np.testing.assert_array_equal(tf.at_user_time(st, np.array([0, 1]), np.array([1, 1])), [[0, 1], [1, 2]])
    again = tf.Stats.from_arrays(st.arrays())
    np.testing.assert_array_equal(again.event_keys, st.event_keys)


def planted(n_users=240, n_groups=12, per_group=10, seed=0) -> tuple[TrainData, sp.csr_matrix, sp.csr_matrix]:
    """Each user walks one group of items in a random order, after two events on globally popular
    items: the next items are those co-occurring with the user's, which popularity cannot see."""
    rng = np.random.default_rng(seed)
    n_items = n_groups * per_group + 5
    users, items, days = [], [], []
    for u in range(n_users):
        g = u % n_groups
        walk = rng.permutation(per_group)[:8] + g * per_group
        head = rng.choice(5, 2, replace=False) + n_groups * per_group  # 5 popular items everyone touches
        seq = np.concatenate((head, walk))
        users += [u] * len(seq)
        items += seq.tolist()
        days += list(range(len(seq)))
    full = TrainData(
        n_users, n_items, np.array(users), np.array(items), np.array(days) * DAY, np.full(len(users), np.nan)
    )
    held = dataset.temporal_holdout(full.user_idx, full.timestamp, full.item_idx, 0.2)
    train = tsm.subset(full, ~held)
    rel = sp.csr_matrix(
        (np.ones(int(held.sum()), np.float32), (full.user_idx[held], full.item_idx[held])), shape=(n_users, n_items)
    )
    seen = sp.csr_matrix((np.ones(len(train.user_idx), np.float32), (train.user_idx, train.item_idx)), shape=rel.shape)
    seen.data[:] = 1.0
    return train, rel, seen


def test_ranker_learns_a_planted_signal_the_single_source_misses():
    train, relevant, seen = planted()
    config = TwoStageConfig(
        enabled=True,
        sources={"model": 20, "cooccurrence": 20},
        validation_fraction=0.25,
        ranker=RankerConfig(epochs=60),
    )
    make = lambda data: build_by_kind("popularity").fit(data)  # noqa: E731
    ranker = tsm.fit(config, train, make)
    stage = tsm.TwoStage.build(config, ranker, train, make(train))
    two, _, _ = tsm.evaluate(stage, relevant, 5)
    single, _, _ = scoring.evaluate_model(make(train), relevant, seen, 5)
    assert single["ndcg"] < 0.1  # popularity knows nothing of the groups
    assert two["ndcg"] > single["ndcg"] + 0.4


def test_ranker_round_trips_through_its_text_format():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 3)).astype(np.float32)
    y = (X[:, 0] > 1.0).astype(np.float32)
    ranker = Ranker.train(X, y, np.full(20, 20), ["a", "b", "c"], RankerConfig(epochs=20))
    again = Ranker.from_bytes(ranker.to_bytes())
    np.testing.assert_array_equal(again.predict(X), ranker.predict(X))
    assert again.feature_names == ["a", "b", "c"]


@pytest.mark.slow
def test_ranker_training_never_sees_the_holdout(ctx):
    """Change every held-out event (items and times): the ranker a run judges is the same bytes."""
    run_all(ctx, until="features")
    feats = dataset.Features.read(ctx)
    config = TwoStageConfig(enabled=True, ranker=RankerConfig(epochs=20))
    make = lambda data: build(ALSConfig(factors=8, iterations=3), "cpu").fit(data)  # noqa: E731
    first = tsm.fit_train_split(config, feats, None, make).to_bytes()
    ev = feats.events.copy()
    held = ev["holdout"].to_numpy()
    rng = np.random.default_rng(1)
    ev.loc[held, "item_idx"] = rng.integers(0, feats.n_items, int(held.sum())).astype(np.int32)
    ev.loc[held, "rating"] = 5.0
    changed = dataclasses.replace(feats, events=ev)
    assert tsm.fit_train_split(config, changed, None, make).to_bytes() == first
    # and the carved targets are train events only
    train = TrainData.from_events(feats.split(False), feats.n_users, feats.n_items)
    fit, target = tsm.carve(train, config.validation_fraction)
    train_pairs = feats.matrix(False)
    assert target.nnz > 0 and (target.multiply(train_pairs) != target).nnz == 0
    assert len(fit.user_idx) < len(train.user_idx)


def test_config_rejects_unknown_sources():
    with pytest.raises(ValueError, match="unknown candidate source"):
        TwoStageConfig(sources={"model": 10, "telepathy": 5})


def test_sources_keep_one_order_whatever_the_file_says():
    """The order is the ranker's feature columns: a config snapshot with sorted keys must not permute them."""
    a = TwoStageConfig(sources={"segment_popularity": 5, "model": 10, "cooccurrence": 7})
    b = TwoStageConfig.model_validate_json(a.model_dump_json())
    assert list(a.sources) == list(b.sources) == ["model", "cooccurrence", "segment_popularity"]


def test_ranker_training_rows_are_bounded_by_a_seeded_user_sample():
    train, _, _ = planted(n_users=120)
    make = lambda data: build_by_kind("popularity").fit(data)  # noqa: E731
    config = TwoStageConfig(sources={"model": 10, "cooccurrence": 10}, validation_fraction=0.25, max_training_users=30)
    X, y, sizes, names, counts = tsm.training_set(config, train, make)
    assert counts["users"] == 30 and counts["users_with_targets"] == 120
    assert len(X) == len(y) == sizes.sum() and len(sizes) <= 30 and len(names) == X.shape[1]
    again = tsm.training_set(config, train, make)
    np.testing.assert_array_equal(again[0], X)
