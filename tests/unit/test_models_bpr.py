import numpy as np
import pytest
import torch

from pipeline.config.models import BPRConfig, model_config
from pipeline.config.tenant import TenantConfig
from pipeline.evaluation import scoring
from pipeline.models import TrainData, build
from pipeline.models.bpr import BPR, bpr_step, is_positive, pick_negative
from pipeline.models.bpr_kernel import sgd_epoch, shuffled
from pipeline.models.popularity import Popularity

SMALL = {"factors": 16, "epochs": 25, "batch_size": 512, "learning_rate": 0.05}


def _ndcg(model, feats) -> float:
    return scoring.evaluate_model(model, feats.relevant(), feats.matrix(False), 10)[0]["ndcg"]


@pytest.mark.parametrize("loop", ["cpu", "torch"])
def test_bpr_beats_popularity_and_loss_decreases(split, monkeypatch, loop):
    # "torch": the CUDA path's mini-batch tensor step, run here on the CPU in place of the compiled loop
    feats, data = split
    if loop == "torch":
        monkeypatch.setattr(BPR, "_epochs_cpu", BPR._epochs_torch)
    losses: list[float] = []
    bpr = BPR(BPRConfig(**SMALL)).fit(data, callback=lambda _it, v: losses.append(v["loss"]))
    assert len(losses) == SMALL["epochs"]
    assert bpr.user_vectors().shape == (data.n_users, SMALL["factors"] + 1)  # + the item bias column (user: 1)
    assert losses[-1] < 0.7 * losses[0]
    assert _ndcg(bpr, feats) > _ndcg(Popularity().fit(data), feats) * 1.1


def test_hogwild_threads_train_as_well_as_one(split):
    feats, data = split
    one = _ndcg(BPR(BPRConfig(**SMALL)).fit(data), feats)
    two = _ndcg(BPR(BPRConfig(**SMALL, threads=2)).fit(data), feats)
    assert two > 0.9 * one and two > _ndcg(Popularity().fit(data), feats) * 1.1


def test_bpr_learns_a_planted_structure():
    # two tastes: users 0-29 pick among items 0-19, users 30-59 among items 20-39 (60% of them)
    rng = np.random.default_rng(0)
    users, items = [], []
    for u in range(60):
        group = np.arange(20) + (0 if u < 30 else 20)
        chosen = rng.choice(group, 12, replace=False)
        users += [u] * 12
        items += list(chosen)
    n = len(users)
    data = TrainData(60, 40, np.array(users), np.array(items), np.arange(n), np.ones(n))
    model = BPR(BPRConfig(factors=8, epochs=40, batch_size=64, negatives=3, item_bias=False)).fit(data)
    assert model.user_vectors().shape == (60, 8)  # no bias column without item_bias
    scores = model.user_vectors() @ model.item_vectors().T
    own = np.where(np.arange(60)[:, None] < 30, np.arange(40)[None, :] < 20, np.arange(40)[None, :] >= 20)
    seen = np.zeros((60, 40), bool)
    seen[users, items] = True
    unseen_own = np.where(own & ~seen, scores, np.nan)
    other = np.where(~own, scores, np.nan)
    # every user scores each of their own taste's unseen items above the other taste's mean
    assert (np.nanmin(unseen_own, axis=1) > np.nanmean(other, axis=1)).mean() > 0.95


def test_is_positive_matches_sets():
    rng = np.random.default_rng(1)
    rows = [np.sort(rng.choice(50, size, replace=False)) for size in (0, 1, 2, 7, 50, 13)]
    items = torch.as_tensor(np.concatenate(rows).astype(np.int64))
    indptr = torch.as_tensor(np.concatenate(([0], np.cumsum([len(r) for r in rows]))))
    u = torch.as_tensor(rng.integers(0, len(rows), 400))
    c = torch.as_tensor(rng.integers(0, 50, (400, 3)))
    got = is_positive(indptr, items, u, c, rounds=int(np.ceil(np.log2(51))))
    want = np.array([[int(x) in set(rows[int(uu)]) for x in cc] for uu, cc in zip(u, c, strict=True)])
    assert np.array_equal(got.numpy(), want)


def test_pick_negative_equals_masking_every_positive_candidate():
    # dense rows (20 of 30 items positive) so most first picks are positives and need re-picks
    rng = np.random.default_rng(2)
    rows = [np.sort(rng.choice(30, 20 if k % 5 else 30, replace=False)) for k in range(40)]  # every 5th: all
    items = torch.as_tensor(np.concatenate(rows).astype(np.int64))
    indptr = torch.as_tensor(np.concatenate(([0], np.cumsum([len(r) for r in rows]))))
    u = torch.as_tensor(rng.integers(0, 40, 500))
    cand = torch.as_tensor(rng.integers(0, 30, (500, 4)))
    scores = torch.as_tensor(rng.normal(size=(500, 4)), dtype=torch.float32)
    rounds = int(np.ceil(np.log2(31)))
    j, ok = pick_negative(scores, cand, u, indptr, items, rounds)
    pos = is_positive(indptr, items, u, cand, rounds)
    best = scores.masked_fill(pos, float("-inf")).argmax(1, keepdim=True)
    assert torch.equal(ok, ~pos.all(1)) and 0 < int(ok.sum()) < 500
    assert torch.equal(j[ok], cand.gather(1, best).squeeze(1)[ok])
    assert torch.equal(j[~ok], cand[~ok, 0])
    j1, ok1 = pick_negative(None, cand[:, :1], u, indptr, items, rounds)  # one candidate: no scores needed
    assert torch.equal(j1, cand[:, 0]) and torch.equal(ok1, ~pos[:, 0])


def test_negatives_that_are_positives_are_skipped():
    # user 0 has items 0 and 1; a step whose only candidate is item 1 changes nothing
    P, Q, b = torch.ones(1, 2), torch.ones(3, 2), torch.zeros(3)
    acc_p, acc_q = torch.zeros(1), torch.zeros(3)
    indptr, items = torch.tensor([0, 2]), torch.tensor([0, 1])
    u, i = torch.tensor([0]), torch.tensor([0])
    loss = bpr_step(
        P, Q, b, acc_p, acc_q, u, i, torch.tensor([[1]]), torch.ones(1), indptr, items, 0.1, 0.0, 2, False, True
    )
    assert float(loss) == 0.0 and torch.equal(Q, torch.ones(3, 2)) and torch.equal(b, torch.zeros(3))
    # with a real negative (item 2) the positive moves up and the negative down
    bpr_step(
        P, Q, b, acc_p, acc_q, u, i, torch.tensor([[1, 2]]), torch.ones(1), indptr, items, 0.1, 0.0, 2, False, True
    )
    assert b[0] > 0 > b[2] and b[1] == 0


def test_bpr_config_from_a_tenant_file_and_registry():
    cfg = TenantConfig.model_validate({"tenant": "a", "source": {"uri": "x"}, "model": {"kind": "bpr", "epochs": 3}})
    assert isinstance(cfg.model, BPRConfig) and cfg.model.epochs == 3
    default = TenantConfig.model_validate({"tenant": "a", "source": {"uri": "x"}, "model": {"factors": 8}})
    assert default.model.kind == "als"  # kind may be left out
    assert isinstance(build(model_config({"kind": "bpr"}), torch.device("cpu")), BPR)


def _dense_pairs(rng):
    """30 users with sorted rows over 12 items: 3-10 positives each, user 0 owns every item."""
    rows = [np.arange(12)] + [np.sort(rng.choice(12, rng.integers(3, 11), replace=False)) for _ in range(29)]
    users = np.repeat(np.arange(30), [len(r) for r in rows])
    return users, np.concatenate(rows), np.concatenate(([0], np.cumsum([len(r) for r in rows])))


@pytest.mark.parametrize("adagrad", [True, False])
def test_cpu_loop_equals_the_torch_step_one_pair_at_a_time(adagrad):
    # the CPU loop (numba) and the CUDA path's tensor step share one objective: with batch size 1
    # and the same candidates they must make the same updates, skips and re-picks included
    rng = np.random.default_rng(3)
    users, items, indptr = _dense_pairs(rng)
    n, f = len(users), 8
    weight = rng.uniform(0.2, 1.5, n).astype(np.float32)
    order = rng.permutation(np.concatenate([np.arange(n)] * 3)).astype(np.int32)  # three epochs' worth
    cands = rng.integers(0, 12, (len(order), 4))
    P0, Q0 = (rng.normal(0, 0.3, (30, f)).astype(np.float32), rng.normal(0, 0.3, (12, f)).astype(np.float32))
    b0 = rng.normal(0, 0.1, 12).astype(np.float32)
    mine = (P0.copy(), Q0.copy(), b0.copy(), np.zeros(30, np.float32), np.zeros(12, np.float32))
    data = (users.astype(np.int32), items.astype(np.int32), weight, indptr.astype(np.int32))
    total, skipped = sgd_epoch(mine, data, order, (4, 0.05, 0.01, True, adagrad), 1, 4, cands)
    theirs = [torch.tensor(a) for a in (P0, Q0, b0, np.zeros(30, np.float32), np.zeros(12, np.float32))]
    ptr, row = torch.tensor(indptr), torch.tensor(items)
    want = 0.0
    for k, o in enumerate(order):
        u, i, c = torch.tensor([users[o]]), torch.tensor([items[o]]), torch.tensor(cands[k : k + 1])
        want += float(
            bpr_step(*theirs, u, i, c, torch.tensor(weight[o : o + 1]), ptr, row, 0.05, 0.01, 4, adagrad, True)
        )
    owned = [set(items[indptr[users[o]] : indptr[users[o] + 1]]) for o in order]
    assert skipped == sum(set(c) <= own for c, own in zip(cands, owned, strict=True)) > 36  # user 0: 36 pairs
    assert sum(bool(set(c) & own) and not set(c) <= own for c, own in zip(cands, owned, strict=True)) > 100  # re-picks
    assert total == pytest.approx(want, rel=1e-4)
    for got, ref in zip(mine, theirs, strict=True):
        assert np.allclose(got, ref.numpy(), atol=2e-5), np.abs(got - ref.numpy()).max()


def test_epoch_order_is_a_seeded_permutation():
    a, b, c = shuffled(1000, 5, np.int32), shuffled(1000, 5, np.int32), shuffled(1000, 6, np.int32)
    assert a.dtype == np.int32 and np.array_equal(np.sort(a), np.arange(1000))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.array_equal(shuffled(1000, 5, np.int64), a)
    # no position keeps a fixed item or neighbour pattern: about 1 fixed point, like a uniform permutation
    assert (a == np.arange(1000)).sum() < 6
    assert len(shuffled(0, 1, np.int32)) == 0 and list(shuffled(1, 1, np.int32)) == [0]


def test_cpu_loop_draws_the_same_candidates_whatever_the_lookahead():
    rng = np.random.default_rng(4)
    users, items, indptr = _dense_pairs(rng)
    order = rng.permutation(len(users))
    data, rule = (users, items, np.ones(len(users), np.float32), indptr), (3, 0.05, 0.01, True, True)
    none = np.zeros((0, 3), np.int64)
    runs = []
    for lookahead in (0, 1, 4, 13):
        arrays = (np.full((30, 4), 0.1, np.float32), np.full((12, 4), 0.1, np.float32), np.zeros(12, np.float32))
        arrays += (np.zeros(30, np.float32), np.zeros(12, np.float32))
        runs.append((sgd_epoch(arrays, data, order, rule, 99, lookahead, none), arrays))
    for out, arrays in runs[1:]:
        assert out == runs[0][0]
        assert all(np.array_equal(a, b) for a, b in zip(arrays, runs[0][1], strict=True))
    with pytest.raises(ValueError, match="lookahead"):
        sgd_epoch(arrays, data, order, rule, 99, 64, none)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bpr_trains_on_cuda(split):
    feats, data = split
    bpr = BPR(BPRConfig(**SMALL), device="cuda").fit(data)
    assert bpr.P.device.type == "cuda" and np.isfinite(bpr.user_vectors()).all()
    assert _ndcg(bpr, feats) > _ndcg(Popularity().fit(data), feats) * 1.1
