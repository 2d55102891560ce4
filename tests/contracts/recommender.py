"""The one contract every registered model kind passes (as implicit's RecommenderBase tests and
LensKit's component tests do): a subclass supplies only `kind` and a factory `make(seed, device)`.

Checked on a small planted-signal data set built here: users in GROUPS taste groups, each
consuming mostly their own group's items with a long-tail (Zipf) popularity inside every
group, plus a few items from other groups; each user's last HOLDOUT events are held out.
A model that learns the groups ranks a user's own-group items above globally popular ones
and beats popularity's NDCG@10, scored by the same full ranking evaluation uses.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from functools import cache
from typing import ClassVar

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from pipeline.evaluation import scoring
from pipeline.models import DotProduct, ItemItem, Recommender, TrainData, registry

GROUPS, USERS_PER_GROUP, ITEMS_PER_GROUP = 4, 40, 20
OWN_EVENTS, OTHER_EVENTS, HOLDOUT = 13, 3, 4
COLD_ITEMS = 2  # catalog items nobody consumed: every model still gives them a row
K = 10


@dataclass(frozen=True)
class Planted:
    train: TrainData
    relevant: sp.csr_matrix  # held-out (user, item) pairs
    exclude: sp.csr_matrix  # the training pairs

    def ndcg(self, model: Recommender) -> float:
        return scoring.evaluate_model(model, self.relevant, self.exclude, K)[0]["ndcg"]


@cache
def planted() -> Planted:
    rng = np.random.default_rng(0)
    n_users, n_warm = GROUPS * USERS_PER_GROUP, GROUPS * ITEMS_PER_GROUP
    n_items = n_warm + COLD_ITEMS
    group_of_item = np.arange(n_warm) // ITEMS_PER_GROUP
    zipf = 1.0 / (1.0 + np.arange(n_warm) % ITEMS_PER_GROUP)  # item 0 of each group is its head
    users, items = [], []
    for u in range(n_users):
        own = group_of_item == u // USERS_PER_GROUP
        mine = rng.choice(np.flatnonzero(own), OWN_EVENTS, replace=False, p=zipf[own] / zipf[own].sum())
        theirs = rng.choice(np.flatnonzero(~own), OTHER_EVENTS, replace=False, p=zipf[~own] / zipf[~own].sum())
        users.append(np.full(OWN_EVENTS + OTHER_EVENTS, u))
        items.append(rng.permutation(np.concatenate([mine, theirs])))  # the order is the time order
    user, item = np.concatenate(users), np.concatenate(items)
    position = np.tile(np.arange(OWN_EVENTS + OTHER_EVENTS), n_users)
    held = position >= OWN_EVENTS + OTHER_EVENTS - HOLDOUT
    stamps = 1_700_000_000 + user * 1000 + position  # distinct: no ties in recency ranks

    def matrix(mask: np.ndarray) -> sp.csr_matrix:
        return sp.csr_matrix((np.ones(int(mask.sum()), np.float32), (user[mask], item[mask])), (n_users, n_items))

    fit = ~held
    train = TrainData(n_users, n_items, user[fit], item[fit], stamps[fit], np.full(int(fit.sum()), np.nan))
    return Planted(train, matrix(held), matrix(fit))


def _config(model: Recommender) -> dict | None:
    """The model's config as stored beside its weights (model.json); popularity has none."""
    config = getattr(model, "config", None)
    return None if config is None else config.model_dump(mode="json", exclude={"search"})


class RecommenderContract(abc.ABC):
    """What every registered kind must do. Subclasses set `kind` and implement `make`."""

    kind: ClassVar[str]
    seeded: ClassVar[bool] = True  # False: the fit is deterministic math, the seed is unused
    beats_popularity_by: ClassVar[float] = 1.2  # NDCG@10 ratio to popularity's on the planted data
    gpu_min_overlap: ClassVar[float] = 0.9  # share of CPU top-10 items a CUDA fit also ranks top-10
    gpu_ndcg_tolerance: ClassVar[float] = 0.01

    @abc.abstractmethod
    def make(self, seed: int, device: str = "cpu") -> Recommender:
        """A fresh, unfitted model of this kind with a small config."""

    @pytest.fixture(scope="class")
    def fitted(self) -> Recommender:
        return self.make(seed=0).fit(planted().train)

    def test_conforms_to_the_protocol(self, fitted):
        data = planted().train
        assert isinstance(fitted, Recommender) and fitted.kind == self.kind and self.kind in registry.KINDS
        assert type(registry.build_by_kind(self.kind, _config(fitted))) is type(fitted)
        if registry.scoring(self.kind) == "item_item":
            assert isinstance(fitted, ItemItem)
            X, S = fitted.interactions(), fitted.similarity()
            assert X.shape == (data.n_users, data.n_items) and S.shape == (data.n_items, data.n_items)
            assert S.dtype == np.float32 and np.isfinite(S.data).all()
            assert (X != planted().exclude).nnz == 0  # scored from exactly the pairs it was fitted on
        else:
            assert isinstance(fitted, DotProduct)
            U, V = fitted.user_vectors(), fitted.item_vectors()
            assert U.dtype == V.dtype == np.float32
            assert U.shape[0] == data.n_users and V.shape == (data.n_items, U.shape[1])
            assert np.isfinite(U).all() and np.isfinite(V).all()
        scores = scoring.user_scores(fitted, np.arange(data.n_users))
        assert scores.dtype == np.float32 and scores.shape == (data.n_users, data.n_items)
        assert np.isfinite(scores).all()

    def test_fit_returns_self_and_the_same_seed_gives_the_same_state(self, fitted):
        again = self.make(seed=0)
        assert again.fit(planted().train) is again
        a, b = fitted.state(), again.state()
        assert sorted(a) == sorted(b) and a
        for name in a:
            assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name
        if self.seeded:  # and the seed is really used
            other = self.make(seed=1).fit(planted().train).state()
            assert any(not np.array_equal(a[name], other[name]) for name in a)

    def test_state_round_trips_through_safetensors(self, fitted):
        blob = st_save(fitted.state(), metadata={"kind": self.kind})
        loaded = registry.build_by_kind(self.kind, _config(fitted)).load_state(st_load(blob))
        rows = np.arange(planted().train.n_users)
        assert np.array_equal(scoring.user_scores(loaded, rows), scoring.user_scores(fitted, rows))
        exclude = planted().exclude
        assert np.array_equal(scoring.topk(loaded, rows, K, exclude), scoring.topk(fitted, rows, K, exclude))

    def test_beats_popularity_on_planted_signal(self, fitted):
        if self.kind == "popularity":
            pytest.skip("popularity is the bar")
        pop = planted().ndcg(registry.build_by_kind("popularity").fit(planted().train))
        assert planted().ndcg(fitted) > self.beats_popularity_by * pop

    @pytest.mark.gpu
    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
    def test_cuda_fit_matches_cpu(self, fitted):
        on_gpu = self.make(seed=0, device="cuda").fit(planted().train)
        rows, exclude = np.arange(planted().train.n_users), planted().exclude
        cpu, gpu = scoring.topk(fitted, rows, K, exclude), scoring.topk(on_gpu, rows, K, exclude)
        overlap = np.mean([len(set(a) & set(b)) / K for a, b in zip(cpu, gpu, strict=True)])
        assert overlap >= self.gpu_min_overlap
        assert planted().ndcg(on_gpu) == pytest.approx(planted().ndcg(fitted), abs=self.gpu_ndcg_tolerance)
