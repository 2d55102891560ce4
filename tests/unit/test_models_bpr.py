import shutil

import numpy as np
import pytest
import torch
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from pipeline import evaluate
from pipeline.config.models import BPRConfig, model_config
from pipeline.config.tenant import TenantConfig
from pipeline.models import TrainData, build, build_by_kind
from pipeline.models.bpr import BPR, bpr_step, is_positive, pick_negative, use_compile
from pipeline.models.popularity import Popularity

SMALL = {"factors": 16, "epochs": 25, "batch_size": 512, "learning_rate": 0.05}


def _ndcg(model, feats) -> float:
    return evaluate.evaluate_model(model, feats.relevant(), feats.matrix(False), 10)[0]["ndcg"]


def test_bpr_beats_popularity_and_loss_decreases(split):
    feats, data = split
    losses: list[float] = []
    bpr = BPR(BPRConfig(**SMALL)).fit(data, callback=lambda _it, v: losses.append(v["loss"]))
    assert len(losses) == SMALL["epochs"]
    assert losses[-1] < 0.7 * losses[0]
    assert _ndcg(bpr, feats) > _ndcg(Popularity().fit(data), feats) * 1.1


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
    scores = model.user_vectors() @ model.item_vectors().T
    own = np.where(np.arange(60)[:, None] < 30, np.arange(40)[None, :] < 20, np.arange(40)[None, :] >= 20)
    seen = np.zeros((60, 40), bool)
    seen[users, items] = True
    unseen_own = np.where(own & ~seen, scores, np.nan)
    other = np.where(~own, scores, np.nan)
    # every user scores each of their own taste's unseen items above the other taste's mean
    assert (np.nanmin(unseen_own, axis=1) > np.nanmean(other, axis=1)).mean() > 0.95


def test_bpr_is_deterministic_and_state_round_trips(split):
    _, data = split
    cfg = BPRConfig(factors=8, epochs=3, batch_size=256, negatives=2, recency_half_life=10.0, seed=7)
    a, b = BPR(cfg).fit(data), BPR(cfg).fit(data)
    assert np.array_equal(a.user_vectors(), b.user_vectors())
    assert np.array_equal(a.item_vectors(), b.item_vectors())
    other = BPR(cfg.model_copy(update={"seed": 8})).fit(data)
    assert not np.array_equal(a.item_vectors(), other.item_vectors())
    state = {k: np.asarray(v) for k, v in st_load(st_save(a.state())).items()}  # safetensors, no pickle
    c = build_by_kind("bpr", cfg.model_dump()).load_state(state)
    assert np.array_equal(c.user_vectors(), a.user_vectors())
    assert np.array_equal(c.item_vectors(), a.item_vectors())
    assert a.user_vectors().shape == (data.n_users, 9)  # 8 factors + the bias column
    assert a.item_vectors().dtype == np.float32


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


def test_compile_auto_only_for_big_cpu_runs(monkeypatch):
    big, small = BPRConfig(epochs=100), BPRConfig(epochs=2)
    assert not use_compile(small, 1_000_000, torch.device("cpu"))
    assert not use_compile(big.model_copy(update={"compile": False}), 10_000_000, torch.device("cpu"))
    assert not use_compile(big, 10_000_000, torch.device("cuda"))
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    assert not use_compile(big, 10_000_000, torch.device("cpu"))  # no C++ compiler: eager
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    assert use_compile(big, 10_000_000, torch.device("cpu"))


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


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="needs a C++ compiler")
def test_compiled_step_matches_eager(split):
    _, data = split
    cfg = BPRConfig(factors=8, epochs=2, batch_size=1024, negatives=2)
    eager = BPR(cfg).fit(data)
    compiled = BPR(cfg.model_copy(update={"compile": True})).fit(data)
    assert np.allclose(eager.item_vectors(), compiled.item_vectors(), atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bpr_trains_on_cuda(split):
    feats, data = split
    bpr = BPR(BPRConfig(**SMALL), device="cuda").fit(data)
    assert bpr.P.device.type == "cuda" and np.isfinite(bpr.user_vectors()).all()
    assert _ndcg(bpr, feats) > _ndcg(Popularity().fit(data), feats) * 1.1
