"""Every registered kind runs the one recommender contract (tests/contracts/recommender.py)
with a small config: the whole file fits in well under a minute on a CPU."""

from __future__ import annotations

import pytest
import torch

from pipeline.config.models import (
    ALSConfig,
    BPRConfig,
    EASEConfig,
    GraphSAGEConfig,
    ItemKNNConfig,
    LightGCNConfig,
    SASRecConfig,
    TwoTowerConfig,
)
from pipeline.models import Recommender, registry
from tests.contracts.recommender import RecommenderContract

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: threads only add contention


def test_every_registered_kind_runs_the_contract():
    covered = {cls.kind for cls in RecommenderContract.__subclasses__()}
    assert covered == set(registry.KINDS)


class TestPopularity(RecommenderContract):
    kind = "popularity"
    seeded = False

    def make(self, seed: int, device: str = "cpu") -> Recommender:
        return registry.build_by_kind("popularity", device=torch.device(device))


class TestALS(RecommenderContract):
    kind = "als"

    def make(self, seed: int, device: str = "cpu") -> Recommender:
        return registry.build(ALSConfig(factors=16, iterations=6, seed=seed), torch.device(device))


class TestBPR(RecommenderContract):
    kind = "bpr"
    gpu_min_overlap = 0.3  # CUDA trains in mini-batches, the CPU pair by pair: same objective, other path
    gpu_ndcg_tolerance = 0.05

    def make(self, seed: int, device: str = "cpu") -> Recommender:
        cfg = BPRConfig(factors=16, epochs=10, batch_size=256, learning_rate=0.05, seed=seed)
        return registry.build(cfg, torch.device(device))


class TestTwoTower(RecommenderContract):
    kind = "two_tower"
    gpu_min_overlap = 0.3  # another device's random streams: a different (equally good) fit
    gpu_ndcg_tolerance = 0.05

    def make(self, seed: int, device: str = "cpu") -> Recommender:
        cfg = TwoTowerConfig(dim=16, epochs=3, batch_size=128, learning_rate=0.02, history=5, seed=seed)
        return registry.build(cfg, torch.device(device))


class TestGraphSAGE(RecommenderContract):
    kind = "graphsage"
    gpu_min_overlap = 0.3
    gpu_ndcg_tolerance = 0.05

    def make(self, seed: int, device: str = "cpu") -> Recommender:
        cfg = GraphSAGEConfig(dim=16, fanouts=(4, 3), epochs=10, batch_size=512, learning_rate=0.02, seed=seed)
        return registry.build(cfg, torch.device(device))


class TestLightGCN(RecommenderContract):
    kind = "lightgcn"
    gpu_min_overlap = 0.3
    gpu_ndcg_tolerance = 0.05

    def make(self, seed: int, device: str = "cpu") -> Recommender:
        cfg = LightGCNConfig(dim=16, layers=2, epochs=8, batch_size=512, learning_rate=0.02, seed=seed)
        return registry.build(cfg, torch.device(device))


class TestEASE(RecommenderContract):
    kind = "ease"
    seeded = False

    def make(self, seed: int, device: str = "cpu") -> Recommender:
        return registry.build(EASEConfig(regularization=20.0, neighbours=30, seed=seed), torch.device(device))


class TestItemKNN(RecommenderContract):
    kind = "item_knn"
    seeded = False

    def make(self, seed: int, device: str = "cpu") -> Recommender:
        return registry.build(ItemKNNConfig(neighbours=20, seed=seed), torch.device(device))


class TestSASRec(RecommenderContract):
    kind = "sasrec"
    gpu_min_overlap = 0.3  # another device's dropout and kernels: a different (equally good) fit
    gpu_ndcg_tolerance = 0.05

    def make(self, seed: int, device: str = "cpu") -> Recommender:
        cfg = SASRecConfig(dim=16, max_len=10, epochs=12, batch_size=64, learning_rate=0.01, seed=seed)
        return registry.build(cfg, torch.device(device))
