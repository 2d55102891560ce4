import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.metrics import ndcg_score

from pipeline.evaluation import metrics, ranking


def _rel(rows_items: list[list[int]], n_items: int) -> sp.csr_matrix:
    r = [u for u, items in enumerate(rows_items) for _ in items]
    c = [i for items in rows_items for i in items]
    return sp.csr_matrix((np.ones(len(r)), (r, c)), shape=(len(rows_items), n_items))


def test_hand_computed_cases():
    # items a=0 b=1 c=2 d=3 x=4 y=5 z=6; everyone is shown [a, b, c]
    topk = np.array([[0, 1, 2], [0, 1, 2], [0, 1, 2]])
    relevant = _rel([[0, 2], [3], [1, 4, 5, 6]], 7)
    rows = np.arange(3)
    hits = metrics.hits_matrix(topk, rows, relevant)
    assert hits.tolist() == [[True, False, True], [False, False, False], [False, True, False]]
    m = metrics.per_user_metrics(hits, np.diff(relevant.indptr))
    assert m["precision"] == pytest.approx([2 / 3, 0, 1 / 3])
    assert m["recall"] == pytest.approx([1.0, 0, 1 / 4])
    assert m["hit_rate"] == pytest.approx([1, 0, 1])
    idcg2 = 1 + 1 / np.log2(3)
    idcg3 = 1 + 1 / np.log2(3) + 1 / np.log2(4)
    assert m["ndcg"] == pytest.approx([(1 + 1 / np.log2(4)) / idcg2, 0, (1 / np.log2(3)) / idcg3])
    assert m["map"] == pytest.approx([(1 + 2 / 3) / 2, 0, (1 / 2) / 3])
    summary = metrics.summarize(m, topk, 7)
    assert summary["coverage"] == pytest.approx(3 / 7)
    assert summary["ndcg"] == pytest.approx(np.mean(m["ndcg"]))


def test_ndcg_matches_sklearn_on_random_cases():
    rng = np.random.default_rng(7)
    n_users, n_items, k = 60, 40, 10
    scores = rng.random((n_users, n_items))  # continuous: no ties
    truth = (rng.random((n_users, n_items)) < 0.15).astype(float)
    truth[truth.sum(1) == 0, 0] = 1.0
    top = ranking.topk_dot(scores.astype(np.float32), np.eye(n_items, dtype=np.float32), k)
    hits = metrics.hits_matrix(top, np.arange(n_users), sp.csr_matrix(truth))
    ours = metrics.per_user_metrics(hits, truth.sum(1))["ndcg"]
    theirs = [ndcg_score(truth[u : u + 1], scores[u : u + 1], k=k) for u in range(n_users)]
    assert ours == pytest.approx(theirs, abs=1e-6)


def test_topk_excludes_and_marks_short_lists():
    users = np.array([[1.0], [1.0]], dtype=np.float32)
    items = np.array([[3.0], [2.0], [1.0]], dtype=np.float32)
    exclude = sp.csr_matrix(np.array([[1, 0, 0], [1, 1, 0]]))
    top = ranking.topk_dot(users, items, 3, exclude=exclude)
    assert top[0].tolist() == [1, 2, -1]
    assert top[1].tolist() == [2, -1, -1]
    # an excluded slot (-1) is never a hit, even for the previous row's last item
    rel = _rel([[2], [0]], 3)
    assert metrics.hits_matrix(top, np.array([0, 1]), rel).tolist() == [[False, True, False], [False, False, False]]


def test_item_allowed_mask():
    users = np.ones((1, 1), dtype=np.float32)
    items = np.array([[3.0], [2.0], [1.0]], dtype=np.float32)
    top = ranking.topk_dot(users, items, 2, item_allowed=np.array([False, True, True]))
    assert top.tolist() == [[1, 2]]
