import numpy as np
import pytest
import torch

from pipeline.config.models import ALSConfig
from pipeline.evaluation import scoring
from pipeline.models import TrainData, TrainingDiverged
from pipeline.models.als import ALS
from pipeline.models.pairs import recency_target, training_pairs
from pipeline.models.popularity import Popularity


def _ndcg(model, feats):
    summary, _, _ = scoring.evaluate_vectors(
        model.user_vectors(), model.item_vectors(), feats.relevant(), feats.matrix(False), 10
    )
    return summary["ndcg"]


def test_als_loss_decreases_and_never_increases(split):
    _, data = split
    losses = []
    ALS(ALSConfig(factors=16, iterations=8)).fit(data, callback=lambda it, v: losses.append(v["loss"]))
    assert len(losses) == 8 and losses[-1] < losses[0]
    assert all(b <= a + 1e-6 for a, b in zip(losses, losses[1:], strict=False))  # ALS never increases its objective


def test_tiled_solver_matches_single_tile(split):
    _, data = split
    cfg = ALSConfig(factors=8, iterations=2, solver="cholesky")
    big = ALS(cfg).fit(data)
    tiny = ALS(cfg, block_floats=36 * 7).fit(data)  # forces many row/col tiles
    assert np.allclose(big.user_vectors(), tiny.user_vectors(), atol=1e-4)


@pytest.mark.parametrize("solver", ["cholesky", "cg"])
def test_solvers_match_dense_formula(solver):
    # 3 users x 4 items: the batched solve equals numpy's per-user normal equations (CG: exact
    # after f steps on an f x f system, here from a zero start)
    data = TrainData(3, 4, np.array([0, 0, 1, 2, 2]), np.array([0, 1, 1, 2, 3]), np.array([1, 2, 1, 1, 5]), np.ones(5))
    cfg = ALSConfig(
        factors=2, regularization=0.5, reg_exponent=1.0, alpha=2.0, recency_half_life=1.0, recency_floor=0.2
    ).model_copy(update={"solver": solver})
    pairs = training_pairs(data)
    conf = 1.0 + 2.0 * np.log2(1.0 + pairs.events)
    target = recency_target(pairs.newer, 1.0, 0.2)
    model = ALS(cfg, block_floats=3)  # tiny tiles on purpose
    side = model._side(pairs.user, pairs.item, conf, target, 3, 4, cfg.regularization)
    Y = torch.tensor([[0.1, 0.2], [0.3, -0.1], [0.0, 0.4], [0.2, 0.2]])
    X = model._solve(side, Y, torch.zeros(3, 2), steps=2).numpy()
    Yn = Y.numpy().astype(np.float64)
    for u in range(3):
        c, p = np.ones(4), np.zeros(4)
        mine = pairs.user == u
        c[pairs.item[mine]] = conf[mine]
        p[pairs.item[mine]] = target[mine]
        A = Yn.T @ np.diag(c) @ Yn + 0.5 * mine.sum() * np.eye(2)
        assert np.allclose(X[u], np.linalg.solve(A, Yn.T @ (c * p)), atol=1e-5)


def test_recency_targets_count_newer_events_per_user():
    day = 86_400
    stamps = np.array([0, 10 * day, 20 * day, 5 * day, 3])
    data = TrainData(2, 3, np.array([0, 0, 0, 0, 1]), np.array([0, 1, 2, 2, 0]), stamps, np.ones(5))
    pairs = training_pairs(data)  # user 0: item 2 seen twice, latest at day 20
    assert pairs.user.tolist() == [0, 0, 0, 1] and pairs.events.tolist() == [1, 1, 2, 1]
    assert pairs.newer.tolist() == [2, 1, 0, 0]
    assert recency_target(pairs.newer, 1.0, 0.0).tolist() == pytest.approx([0.25, 0.5, 1.0, 1.0])
    assert recency_target(pairs.newer, None, 0.3).tolist() == [1, 1, 1, 1]


def test_cg_converges_to_the_exact_solution_and_tracks_its_quality(split):
    feats, data = split
    exact = ALS(ALSConfig(factors=8, iterations=6, solver="cholesky")).fit(data)
    side = exact._side(*_sides(data, exact.config))
    cg = ALS(exact.config.model_copy(update={"solver": "cg"}))
    warm = exact.X + 0.05 * torch.randn(exact.X.shape, generator=torch.Generator().manual_seed(0))
    target = exact._solve(side, exact.Y, exact.X)
    errs = [float((cg._solve(side, exact.Y, warm, steps=k) - target).norm()) for k in (1, 3, 8)]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-3 * float(target.norm())
    fast = ALS(ALSConfig(factors=8, iterations=6)).fit(data)  # default: 3 CG steps per half-iteration
    assert _ndcg(fast, feats) == pytest.approx(_ndcg(exact, feats), abs=0.02)


def test_cg_blocks_do_not_change_the_result(split):
    _, data = split
    cfg = ALSConfig(factors=8, iterations=3)
    one = ALS(cfg, block_nnz=1 << 40).fit(data)
    many = ALS(cfg, block_nnz=7).fit(data)  # a block every few rows
    assert np.allclose(one.user_vectors(), many.user_vectors(), atol=1e-5)


def test_loss_is_the_dense_objective_and_progress_reports_agree(split):
    _, data = split
    cfg = ALSConfig(factors=4, iterations=3, fold_in_half_life=None)
    losses: list[float] = []
    model = ALS(cfg).fit(data, callback=lambda it, v: losses.append(v["loss"]))
    pairs = training_pairs(data)
    conf = 1.0 + cfg.alpha * np.log2(1.0 + pairs.events)
    target = recency_target(pairs.newer, cfg.recency_half_life, cfg.recency_floor)
    C, P = np.ones((data.n_users, data.n_items)), np.zeros((data.n_users, data.n_items))
    C[pairs.user, pairs.item], P[pairs.user, pairs.item] = conf, target
    X, Y = model.X.double().numpy(), model.Y.double().numpy()
    reg_u = cfg.regularization * np.maximum(np.bincount(pairs.user, minlength=data.n_users), 1)
    reg_i = cfg.regularization * np.maximum(np.bincount(pairs.item, minlength=data.n_items), 1)
    dense = (C * (P - X @ Y.T) ** 2).sum() + reg_u @ (X**2).sum(1) + reg_i @ (Y**2).sum(1)
    assert losses[-1] == pytest.approx(dense / len(pairs.user), rel=1e-4)
    # iterations 1..n-1 are reported from the next half-step's first product: the same numbers
    shorter: list[float] = []
    ALS(cfg.model_copy(update={"iterations": 2})).fit(data, callback=lambda it, v: shorter.append(v["loss"]))
    assert losses[:2] == pytest.approx(shorter, rel=1e-5)


def _sides(data, cfg):
    pairs = training_pairs(data)
    conf = 1.0 + cfg.alpha * np.log2(1.0 + pairs.events)
    target = recency_target(pairs.newer, cfg.recency_half_life, cfg.recency_floor)
    return pairs.user, pairs.item, conf, target, data.n_users, data.n_items, cfg.regularization


def test_nan_input_diverges_with_clear_error(split):
    _, data = split
    bad = ALS(ALSConfig(factors=4, iterations=2).model_copy(update={"regularization": float("nan")}))
    with pytest.raises(TrainingDiverged):
        bad.fit(data)


def test_popularity_counts_distinct_users_and_breaks_ties_by_index():
    data = TrainData(3, 3, np.array([0, 0, 1, 2, 2]), np.array([2, 2, 1, 1, 0]), np.zeros(5, np.int64), np.ones(5))
    pop = Popularity().fit(data)
    order = np.argsort(-pop.item_vectors()[:, 0], kind="stable")
    assert order.tolist() == [1, 0, 2]  # item1: 2 users; items 0 and 2: 1 user each -> index order


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("solver", ["cg", "cholesky"])
def test_als_on_cuda_matches_cpu(split, solver):
    feats, data = split
    cfg = ALSConfig(factors=16, iterations=6).model_copy(update={"solver": solver})
    cpu = ALS(cfg).fit(data)
    gpu = ALS(cfg, device="cuda").fit(data)
    assert gpu.X.device.type == "cuda" and np.isfinite(gpu.user_vectors()).all()
    assert _ndcg(gpu, feats) == pytest.approx(_ndcg(cpu, feats), abs=0.01)
    assert np.allclose(gpu.item_vectors(), cpu.item_vectors(), atol=1e-2)
