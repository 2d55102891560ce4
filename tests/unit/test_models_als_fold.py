"""The ALS fold-in (pipeline/models/als_fold.py): one closed form for training and serving."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from pipeline.config.models import ALSConfig
from pipeline.models import TrainData, registry
from pipeline.models.als import ALS
from pipeline.models.als_fold import fold_in_terms, fold_in_user
from pipeline.models.pairs import training_pairs


def test_fold_in_is_the_closed_form_least_squares():
    rng = np.random.default_rng(0)
    y = rng.normal(size=(30, 4)).astype(np.float32)
    history, events = np.array([7, 2, 19]), np.array([2, 1, 1])
    cfg = ALSConfig(alpha=1.0, fold_in_half_life=2.0, fold_in_floor=0.1, fold_in_regularization=0.3, reg_exponent=1.0)
    got = fold_in_user(y, (y.T @ y).astype(np.float64), history, events, cfg)
    # the same objective, solved independently as weighted least squares over ALL items
    c, p = np.ones(30), np.zeros(30)
    c[history] = 1 + np.log2(1 + events)
    p[history] = 0.1 + 0.9 * 0.5 ** (np.arange(3) / 2.0)
    reg = 0.3 * 3
    a = np.vstack([np.sqrt(c)[:, None] * y, np.sqrt(reg) * np.eye(4)])
    b = np.concatenate([np.sqrt(c) * p, np.zeros(4)])
    want = np.linalg.lstsq(a, b, rcond=None)[0]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_without_a_fold_in_half_life_the_training_terms_apply():
    # the trainer then serves its last alternating solve: target and lambda of the objective itself
    cfg = ALSConfig(fold_in_half_life=None, recency_half_life=7.0, recency_floor=0.2, regularization=0.4)
    terms = fold_in_terms(cfg)
    assert (terms.half_life, terms.floor, terms.regularization) == (7.0, 0.2, 0.4)
    sharp = fold_in_terms(ALSConfig(fold_in_half_life=3.0, fold_in_floor=0.05, fold_in_regularization=0.3))
    assert (sharp.half_life, sharp.floor, sharp.regularization) == (3.0, 0.05, 0.3)


def _histories(seed: int = 1) -> TrainData:
    """40 users x 25 items, some pairs seen twice, every event at its own second."""
    rng = np.random.default_rng(seed)
    users, items = [], []
    for u in range(40):
        own = rng.choice(25, rng.integers(3, 9), replace=False)
        again = rng.choice(own, 2)
        users.append(np.full(len(own) + 2, u))
        items.append(rng.permutation(np.concatenate([own, again])))
    user, item = np.concatenate(users), np.concatenate(items)
    return TrainData(40, 25, user, item, np.arange(len(user)) * 7, np.ones(len(user)))


@pytest.mark.parametrize("solver", ["cholesky", "cg"])
def test_serving_fold_in_of_a_trained_users_history_is_their_stored_vector(solver):
    # CG is exact after `factors` steps, so both solvers must agree to float32 precision; a
    # wrong term (e.g. fold_in_floor 0.1 for 0.05) moves vectors by > 2e-3 here
    data = _histories()
    cfg = ALSConfig(factors=6, iterations=4, fold_in_cg_steps=6, solver=solver)
    model = ALS(cfg).fit(data)
    Y = model.item_vectors()
    gram = Y.astype(np.float64).T @ Y.astype(np.float64)
    pairs = training_pairs(data)  # sorted by (user, item); newer = rank by latest event
    for u in range(data.n_users):
        mine = np.flatnonzero(pairs.user == u)
        order = mine[np.argsort(pairs.newer[mine])]  # most recent first
        vector = fold_in_user(Y, gram, pairs.item[order], pairs.events[order], cfg)
        np.testing.assert_allclose(vector, model.user_vectors()[u], atol=1e-5)


def test_the_registry_says_which_kinds_fold_in():
    assert registry.fold_in("als") == "vector"  # the closed form above
    assert registry.fold_in("ease") == registry.fold_in("item_knn") == "seen_list"  # they score from it
    assert registry.fold_in("sasrec") == "sequence"  # its encoder over the new seen list
    assert {k for k in registry.KINDS if registry.folds_in(k)} == {"als", "ease", "item_knn", "sasrec"}
    assert not registry.folds_in("no-such-kind") and registry.fold_in("no-such-kind") is None


def test_serving_and_the_registry_load_no_torch():
    code = (
        "import sys\n"
        "import pipeline.serving.app\n"
        "from pipeline.models import als_fold, itemitem, registry\n"
        "assert registry.folds_in('als') and registry.scoring('ease') == 'item_item'\n"
        "print(sorted(m for m in ('torch', 'torch_geometric') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
