"""Event weights reach every model; diversity, novelty and segments are what they say."""

import json

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from pipeline.config.models import model_config
from pipeline.evaluation import beyond
from pipeline.models import TrainData, build_by_kind
from pipeline.models.als_fold import confidence
from pipeline.models.pairs import training_pairs
from pipeline.storage import codecs, paths

# small, fast configs per kind: enough to see that a weight moves the vectors
FAST = {
    "als": {"factors": 8, "iterations": 3},
    "bpr": {"factors": 8, "epochs": 3},
    "two_tower": {"dim": 8, "epochs": 2, "batch_size": 64},
    "graphsage": {"dim": 8, "epochs": 2, "batch_size": 64, "fanouts": [3]},
    "lightgcn": {"dim": 8, "epochs": 2, "batch_size": 128, "layers": 1},
    "ease": {"regularization": 10.0},
    "item_knn": {"neighbours": 10},
}


def _events(n_users=40, n_items=30, per_user=12, seed=0):
    rng = np.random.default_rng(seed)
    u = np.repeat(np.arange(n_users), per_user)
    i = rng.integers(0, n_items, len(u))
    t = np.arange(len(u)) * 60 + 1_700_000_000
    kind = rng.choice(np.array(["view", "purchase"]), len(u), p=[0.7, 0.3])
    return u, i, t, kind


def _data(weights: dict[str, float] | None, n_users=40, n_items=30) -> TrainData:
    u, i, t, kind = _events(n_users, n_items)
    w = None if weights is None else np.array([weights[k] for k in kind], dtype=np.float64)
    return TrainData(n_users, n_items, u, i, t, np.full(len(u), np.nan), weight=w)


def _fitted(kind: str, data: TrainData) -> list[np.ndarray]:
    model = build_by_kind(kind, model_config({"kind": kind, **FAST[kind]}))
    model.fit(data)
    return [np.asarray(v) for v in model.state().values()]


@pytest.mark.parametrize("kind", sorted(FAST))
def test_one_event_types_weight_changes_the_vectors_and_the_same_weights_repeat(kind, one_torch_thread):
    base = _fitted(kind, _data({"view": 1.0, "purchase": 1.0}))
    again = _fitted(kind, _data({"view": 1.0, "purchase": 1.0}))
    heavier = _fitted(kind, _data({"view": 1.0, "purchase": 8.0}))
    assert all(np.array_equal(a, b) for a, b in zip(base, again, strict=True))
    assert any(a.shape != b.shape or not np.allclose(a, b) for a, b in zip(base, heavier, strict=True))


@pytest.mark.parametrize("kind", ["als", "ease", "item_knn", "bpr"])
def test_unit_weights_are_the_unweighted_model(kind, one_torch_thread):
    unweighted = _fitted(kind, _data(None))
    ones = _fitted(kind, _data({"view": 1.0, "purchase": 1.0}))
    assert all(np.array_equal(a, b) for a, b in zip(unweighted, ones, strict=True))


def test_a_pairs_weight_is_its_strongest_event_and_scales_als_confidence():
    # user 0: item 1 viewed (1) then bought (8); item 2 viewed twice
    data = TrainData(
        1,
        3,
        np.array([0, 0, 0, 0]),
        np.array([1, 1, 2, 2]),
        np.array([1, 2, 3, 4]),
        np.ones(4),
        weight=np.array([1.0, 8, 1, 1]),
    )
    pairs = training_pairs(data)
    assert pairs.item.tolist() == [1, 2] and pairs.weight.tolist() == [8.0, 1.0] and pairs.events.tolist() == [2, 2]
    # c = 1 + alpha * w * log2(1 + events): 1 + 0.5 * 8 * log2(3), 1 + 0.5 * 1 * log2(3)
    assert np.allclose(confidence(pairs.events, 0.5, pairs.weight), [1 + 4 * np.log2(3), 1 + 0.5 * np.log2(3)])


def test_diversity_by_hand():
    # items 0, 1: same category; item 2: another; item 3: no attributes at all
    items = sp.csr_matrix(np.array([[1, 0], [1, 0], [0, 1], [0, 0]], dtype=float))
    top = np.array([[0, 1, -1], [0, 2, -1], [0, 1, 2], [3, 0, -1], [2, -1, -1]])
    # pairs' cosines: (0,1)=1 -> 0; (0,2)=0 -> 1; {0,1,2}: 6 ordered pairs, cos sum 2 -> 1 - 2/6; an
    # item without attributes is unlike everything -> 1; one item: no pairs -> NaN
    got = beyond.intra_list_diversity(top, items)
    assert np.allclose(got[:4], [0.0, 1.0, 1 - 2 / 6, 1.0]) and np.isnan(got[4])
    # scale does not matter (cosine): a tag matrix with weights 3 gives the same
    assert np.allclose(beyond.intra_list_diversity(top, items * 3)[:4], got[:4])


def test_diversity_past_the_exact_budget_is_a_close_unbiased_sketch():
    """Past `exact_work` the unit rows are hashed to SKETCH_DIMS signed buckets: the mean
    diversity stays within 0.01 of the exact one and each list's within the per-pair error
    bound; the same rows always hash the same way (a run's figure is reproducible)."""
    rng = np.random.default_rng(4)
    behaviour = sp.csr_matrix((rng.random((300, 3000)) < rng.uniform(0.002, 0.3, (300, 1))).astype(float))
    top = rng.permuted(np.tile(np.arange(300), (400, 1)), axis=1)[:, :10]
    exact = beyond.intra_list_diversity(top, behaviour)
    sketched = beyond.intra_list_diversity(top, behaviour, exact_work=0)
    assert abs(exact.mean() - sketched.mean()) < 0.01
    assert np.abs(exact - sketched).max() < 3 * np.sqrt(2 / beyond.SKETCH_DIMS)
    assert np.array_equal(sketched, beyond.intra_list_diversity(top, behaviour, exact_work=0))
    unit = sp.csr_matrix(behaviour.multiply(1 / np.sqrt(behaviour.sum(axis=1))))
    dense = beyond.sketch(unit, beyond.SKETCH_DIMS, block=7)  # blocks of rows give the same rows
    assert np.allclose(dense, beyond.sketch(unit, beyond.SKETCH_DIMS)) and np.allclose((dense**2).sum(1), 1, atol=0.3)


def test_novelty_by_hand():
    users = np.array([3, 1, 0])  # distinct train users per item, 3 users in all
    top = np.array([[0, 1], [2, -1], [-1, -1]])
    # -log2((3+1)/4) = 0, -log2(2/4) = 1, -log2(1/4) = 2
    got = beyond.novelty(top, users, 3)
    assert np.allclose(got[:2], [0.5, 2.0]) and np.isnan(got[2])


def test_segments_by_hand():
    assert beyond.activity_bucket(np.array([0, 4, 5, 19, 20, 199, 200])).tolist() == [
        "<5",
        "<5",
        "5-19",
        "5-19",
        "20-49",
        "50-199",
        "200+",
    ]
    per_user = {"ndcg": np.array([1.0, 0.0, 0.5]), "diversity": np.array([0.2, np.nan, 0.4])}
    top = np.array([[0, 1], [0, 2], [3, -1]])
    report = beyond.segment_report(per_user, top, 5, {"g": np.array(["a", "a", "b"], dtype=object)}, 2)
    assert report["g"]["a"] == {"users": 2, "ndcg@2": 0.5, "diversity@2": 0.2, "coverage": 3 / 5}
    assert report["g"]["b"] == {"users": 1, "ndcg@2": 0.5, "diversity@2": 0.4, "coverage": 1 / 5}
    text = beyond.attribute_segments(pd.Series(["F", "M", None, "M"], dtype="string"))
    assert text.tolist() == ["F", "M", "unknown", "M"]


def test_evaluate_reports_diversity_novelty_and_segments(settings, small_df):
    from pipeline.context import RunContext
    from pipeline.stages import run_all
    from tests.conftest import INTERVAL_END, write_tenant

    users = pd.DataFrame({"user_id": sorted(small_df["user_id"].unique())})
    users["plan"] = np.where(np.arange(len(users)) % 3 == 0, "pro", "free")
    path = settings.data_root / "sources" / "seg" / "users.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    users.to_csv(path, index=False)
    cfg = write_tenant(settings, "seg", small_df, users={"uri": str(path)})
    ctx = RunContext(config=cfg, interval_end=INTERVAL_END, settings=settings)
    ev = run_all(ctx, until="evaluate")["evaluate"]
    stored = json.loads(ctx.store.get(ctx.key(paths.METRICS)))
    model = stored["model"]
    for vals in stored["metrics"].values():
        assert 0.0 <= vals["diversity@10"] <= 1.0 and vals["novelty@10"] > 0
    segs = stored["segments"]
    assert set(segs) == {"activity", "cold_warm", "user.plan"} and set(segs["user.plan"]) == {"free", "pro"}
    assert sum(g["users"] for g in segs["user.plan"].values()) == ev["users"]
    per_user = codecs.read_parquet(ctx.store.get(ctx.key(paths.PER_USER_METRICS)))
    pro = per_user[per_user["segment_user.plan"] == "pro"]
    assert np.isclose(pro[f"{model}_ndcg"].mean(), segs["user.plan"]["pro"]["ndcg@10"])
    assert np.isclose(per_user[f"{model}_diversity"].mean(), stored["metrics"][model]["diversity@10"])


def test_ridge_map_gives_a_cold_item_its_categorys_direction():
    from pipeline.models.attribute_map import cold_vectors
    from pipeline.models.base import ItemFeatures

    # items 0-1 category 0 point along x, items 2-3 category 1 along y; item 4 (category 0) and
    # item 5 (no attributes) have no events
    feats = ItemFeatures(
        category=np.array([0, 0, 1, 1, 0, -1]),
        tags=sp.csr_matrix((6, 0)),
        tokens=sp.csr_matrix((6, 4)),
    )
    Y = np.array([[1.0, 0], [1, 0], [0, 1], [0, 1], [0, 0], [0, 0]], dtype=np.float32)
    rows, vectors = cold_vectors(feats, Y, np.array([3, 3, 3, 3, 0, 0]), lam=0.01)
    # ridge by hand: W_cat0 = 2 / (2 + 0.01) along x
    assert rows.tolist() == [4] and np.allclose(vectors, [[2 / 2.01, 0.0]], atol=1e-5)


def test_als_vectors_cold_catalog_items_and_leaves_warm_ones(split, one_torch_thread):
    from dataclasses import replace

    from pipeline.config.models import ALSConfig
    from pipeline.models.als import ALS
    from pipeline.models.base import ItemFeatures

    _, data = split
    n_items = data.n_items + 2  # two catalog items nobody has touched: one in category 0, one bare
    category = np.r_[np.arange(data.n_items) % 3, 0, -1]
    feats = ItemFeatures(category=category, tags=sp.csr_matrix((n_items, 0)), tokens=sp.csr_matrix((n_items, 1)))
    data = replace(data, n_items=n_items, item_features=feats)
    cfg = ALSConfig(factors=8, iterations=3, fold_in_half_life=None)
    with_map = ALS(cfg).fit(data).item_vectors()
    without = ALS(cfg.model_copy(update={"cold_item_regularization": None})).fit(data).item_vectors()
    assert np.array_equal(with_map[:-2], without[:-2])  # warm items: untouched
    # the cold item with a category: a vector of warm items' size; without the map ALS leaves ~0
    assert np.linalg.norm(with_map[-2]) > 0.1 * np.linalg.norm(with_map[:-2], axis=1).mean()
    assert np.linalg.norm(without[-2]) < 1e-3
    assert np.abs(with_map[-1]).sum() == np.abs(without[-1]).sum()  # no attributes: nothing to map from
