import json

import numpy as np
import scipy.sparse as sp

from pipeline.config.models import EASEConfig, ItemKNNConfig
from pipeline.evaluation import ranking, scoring
from pipeline.models import TrainData
from pipeline.models.ease import EASE
from pipeline.models.itemitem import score_seen, score_users
from pipeline.models.itemknn import ItemKNN
from pipeline.storage import codecs, paths

# 4 users x 4 items, checkable by hand
X = np.array([[1, 1, 0, 0], [1, 0, 1, 0], [0, 1, 1, 1], [1, 1, 1, 0]], dtype=np.float64)


def _data(x: np.ndarray, repeat_first: bool = True) -> TrainData:
    u, i = np.nonzero(x)
    if repeat_first:  # a repeated event counts once (binary matrix)
        u, i = np.append(u, u[0]), np.append(i, i[0])
    return TrainData(x.shape[0], x.shape[1], u, i, np.zeros(len(u), np.int64), np.ones(len(u)))


def test_ease_matches_the_closed_form():
    model = EASE(EASEConfig(regularization=0.5, neighbours=None)).fit(_data(X))
    P = np.linalg.inv(X.T @ X + 0.5 * np.eye(4))
    B = np.eye(4) - P / np.diag(P)  # column j divided by P_jj
    np.fill_diagonal(B, 0.0)
    assert np.allclose(model.similarity().toarray(), B, atol=1e-6)
    assert np.allclose(scoring.user_scores(model, np.array([2, 0])), X[[2, 0]] @ B, atol=1e-5)


def test_ease_keeps_each_rows_largest_weights_by_magnitude():
    rng = np.random.default_rng(0)
    x = (rng.random((30, 8)) < 0.4).astype(np.float64)
    full = EASE(EASEConfig(regularization=2.0, neighbours=None)).fit(_data(x, repeat_first=False)).similarity()
    pruned = EASE(EASEConfig(regularization=2.0, neighbours=3)).fit(_data(x, repeat_first=False)).similarity()
    B = full.toarray()
    keep = np.argsort(-np.abs(B), axis=1, kind="stable")[:, :3]
    want = np.zeros_like(B)
    np.put_along_axis(want, keep, np.take_along_axis(B, keep, axis=1), axis=1)
    assert (np.diff(pruned.indptr) <= 3).all() and np.allclose(pruned.toarray(), want)
    assert (pruned.toarray() < 0).any()  # negative weights are kept when they are large


def test_item_knn_is_cosine_with_top_k_neighbours():
    counts = X.sum(0)
    cosine = (X.T @ X) / np.sqrt(np.outer(counts, counts))
    np.fill_diagonal(cosine, 0.0)
    full = ItemKNN(ItemKNNConfig(neighbours=10)).fit(_data(X))
    assert np.allclose(full.similarity().toarray(), cosine, atol=1e-6)
    # item 1's neighbours: items 0 and 2 (2/3 each) beat item 3 (1/sqrt(3)); block_floats forces tiling
    top2 = ItemKNN(ItemKNNConfig(neighbours=2), block_floats=5).fit(_data(X)).similarity().toarray()
    assert np.allclose(top2[1], [2 / 3, 0, 2 / 3, 0], atol=1e-6)
    assert (np.count_nonzero(top2, axis=1) <= 2).all()
    shrunk = ItemKNN(ItemKNNConfig(neighbours=10, shrinkage=3.0)).fit(_data(X)).similarity().toarray()
    assert np.isclose(shrunk[0, 1], 2 / (3 + 3.0))
    assert np.allclose(scoring.user_scores(full, np.arange(4)), X @ cosine, atol=1e-5)


def test_items_and_users_without_events_score_zero():
    x = np.zeros((3, 5))
    x[0, [0, 1]] = x[1, [1, 2]] = 1  # user 2 and items 3, 4 have no events
    for model in (EASE().fit(_data(x)), ItemKNN().fit(_data(x))):
        scores = scoring.user_scores(model, np.arange(3))
        assert np.isfinite(scores).all() and not scores[2].any() and not scores[:, 3:].any()


def test_a_user_is_scored_from_their_seen_rows_alone():
    S = sp.csr_matrix(np.array([[0, 2, 0, 1], [1, 0, 0, 0], [0, 0.5, 0, 3], [4, 0, 1, 0]], dtype=np.float32))
    # seen items 0 and 2 (2 twice): row 0 + row 2 = [0, 2.5, 0, 4]
    assert score_seen(S, np.array([2, 0, 2])).tolist() == [0, 2.5, 0, 4]
    assert score_seen(S, np.array([], dtype=np.int64)).tolist() == [0, 0, 0, 0]
    X4 = sp.csr_matrix(np.array([[1, 0, 1, 0], [0, 0, 0, 1]], dtype=np.float32))
    assert np.array_equal(score_users(X4, S, np.array([0, 1])), [score_seen(S, [0, 2]), score_seen(S, [3])])


def test_topk_scores_agrees_with_topk_dot_and_masks():
    rng = np.random.default_rng(0)
    U, V = rng.normal(size=(7, 3)).astype(np.float32), rng.normal(size=(6, 3)).astype(np.float32)
    exclude = sp.csr_matrix((np.ones(3), ([0, 0, 4], [1, 2, 5])), shape=(7, 6))
    by_dot = ranking.topk_dot(U, V, 4, exclude=exclude, block=3)
    by_fn = ranking.topk_scores(lambda s, e: U[s:e] @ V.T, 7, 6, 4, exclude=exclude, block=3)
    assert np.array_equal(by_dot, by_fn)
    assert not ({1, 2} & set(by_fn[0]))
    allowed = np.array([True, True, False, False, False, False])
    short = ranking.topk_scores(lambda s, e: U[s:e] @ V.T, 7, 6, 3, exclude=exclude, item_allowed=allowed)
    assert list(short[0]) == [0, -1, -1]  # item 1 is excluded for user 0: one item left
    assert set(short[1][:2]) == {0, 1} and short[1][2] == -1


def test_item_item_ranking_is_the_dot_product_of_seen_rows_and_similarity_columns():
    rng = np.random.default_rng(1)
    x = (rng.random((20, 15)) < 0.3).astype(np.float64)
    rel = sp.csr_matrix((rng.random((20, 15)) < 0.2).astype(np.float32))
    model = ItemKNN(ItemKNNConfig(neighbours=5)).fit(_data(x, repeat_first=False))
    exc = model.interactions()
    a = scoring.evaluate_model(model, rel, exc, 5)
    b = scoring.evaluate_vectors(exc.toarray(), model.similarity().T.toarray(), rel, exc, 5)
    assert a[0] == b[0] and np.array_equal(a[2], b[2])


def test_evaluate_reports_every_baseline(ctx):
    from pipeline.stages import run_all

    results = run_all(ctx, until="evaluate")
    ev = results["evaluate"]
    model = ev["model"]
    assert list(ev["metrics"]) == [model, "popularity", "item_knn", "ease"]
    for vals in ev["metrics"].values():
        assert 0.0 <= vals["ndcg@10"] <= 1.0 and vals["users"] == ev["users"]
    stored = json.loads(ctx.store.get(ctx.key(paths.METRICS)))
    assert stored["metrics"] == ev["metrics"]
    per_user = codecs.read_parquet(ctx.store.get(ctx.key(paths.PER_USER_METRICS)))
    for name in ("popularity", "item_knn", "ease", model):
        assert f"{name}_ndcg" in per_user.columns
    assert np.isclose(per_user["ease_ndcg"].mean(), ev["metrics"]["ease"]["ndcg@10"])


def test_evaluate_skips_ease_above_the_item_limit(settings, small_df):
    from pipeline.context import RunContext
    from pipeline.stages import run_all
    from tests.conftest import INTERVAL_END, write_tenant

    cfg = write_tenant(settings, "big", small_df, evaluation={"ease_max_items": 10})
    ev = run_all(RunContext(config=cfg, interval_end=INTERVAL_END, settings=settings), until="evaluate")["evaluate"]
    assert "ease" not in ev["metrics"] and "item_knn" in ev["metrics"]


def test_sample_users_keeps_the_same_lowest_hash_users():
    """At most max_users users with relevant items keep their rows; which ones depends on the
    user ids only (not their row order or the other users), so every run ranks the same users."""
    import pandas as pd

    rng = np.random.default_rng(1)
    dense = rng.random((200, 30)) < 0.1
    dense[5] = False  # a user with nothing to find is never picked
    rel = sp.csr_matrix(dense.astype(np.float32))
    ids = pd.Series([f"user-{n}" for n in range(200)])
    assert scoring.sample_users(rel, ids, 500) is rel  # fewer users than the cap: unchanged
    kept = scoring.sample_users(rel, ids, 50)
    rows = np.flatnonzero(np.diff(kept.indptr) > 0)
    assert len(rows) == 50 and 5 not in rows
    assert (kept[rows] != rel[rows]).nnz == 0  # kept rows are whole
    hashed = pd.util.hash_pandas_object(ids.astype("string"), index=False).to_numpy()
    with_items = np.flatnonzero(np.diff(rel.indptr) > 0)
    assert set(rows) == set(with_items[np.argsort(hashed[with_items])[:50]])
    perm = rng.permutation(200)  # the same users, in another row order
    again = scoring.sample_users(sp.csr_matrix(rel[perm]), ids[perm].reset_index(drop=True), 50)
    assert set(ids[perm].to_numpy()[np.flatnonzero(np.diff(again.indptr) > 0)]) == set(ids[rows])


def test_evaluate_ranks_at_most_max_users_and_skips_knn_above_its_limit(settings, small_df):
    from pipeline.context import RunContext
    from pipeline.stages import run_all
    from tests.conftest import INTERVAL_END, write_tenant

    limits = {"max_users": 7, "knn_max_items": 10, "ease_max_items": 10}
    cfg = write_tenant(settings, "capped", small_df, evaluation=limits)
    ev = run_all(RunContext(config=cfg, interval_end=INTERVAL_END, settings=settings), until="evaluate")["evaluate"]
    assert ev["users"] == 7 and list(ev["metrics"]) == [ev["model"], "popularity"]
    assert all(vals["users"] == 7 for vals in ev["metrics"].values())


def test_popularity_from_the_train_matrix_is_the_fitted_one():
    """Evaluate's shortcut (popularity alone: the binary train matrix's column counts, no
    events read) gives the model `fit` gives, repeats counted once per user."""
    from pipeline.models.popularity import Popularity

    rng = np.random.default_rng(2)
    x = (rng.random((40, 25)) < 0.3).astype(np.float64)
    data = _data(x)  # with a repeated event
    fitted = Popularity().fit(data)
    shortcut = Popularity.from_counts(np.bincount(np.nonzero(x)[1], minlength=25), 40)
    assert np.array_equal(fitted.item_vectors(), shortcut.item_vectors())
    assert all(np.array_equal(a, b) for a, b in zip(fitted.state().values(), shortcut.state().values(), strict=True))
