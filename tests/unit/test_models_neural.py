"""Neural models (two-tower, GraphSAGE, LightGCN) on a tiny planted-cluster catalog.

Four clusters of users and items: every user's events are in their own cluster's items (plus
one random item), and each item's category, tags and title token say its cluster. Two more
catalog items (clusters 0 and 1) have no events at all.
"""

from __future__ import annotations

import abc

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from pipeline.config.models import GraphSAGEConfig, LightGCNConfig, TwoTowerConfig
from pipeline.models import TrainData, build_by_kind
from pipeline.models.base import ItemFeatures
from pipeline.models.graphsage import Graph, GraphSAGE, LightGCN
from pipeline.models.two_tower import TwoTower

CLUSTERS, USERS_PER, ITEMS_PER, EVENTS_PER_USER = 4, 20, 12, 6
N_WARM = CLUSTERS * ITEMS_PER
COLD = {N_WARM: 0, N_WARM + 1: 1}  # item -> cluster: catalog items without events
N_ITEMS = N_WARM + len(COLD)
ITEM_CLUSTER = np.concatenate([np.repeat(np.arange(CLUSTERS), ITEMS_PER), list(COLD.values())])

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: threads only add contention


def _planted(with_features: bool = True) -> TrainData:
    rng = np.random.default_rng(0)
    users, items = [], []
    for u in range(CLUSTERS * USERS_PER):
        c = u // USERS_PER
        own = rng.choice(np.arange(c * ITEMS_PER, (c + 1) * ITEMS_PER), EVENTS_PER_USER, replace=False)
        users += [u] * (EVENTS_PER_USER + 1)
        items += list(rng.permutation([*own, rng.integers(N_WARM)]))  # the random item anywhere in time
    n = len(users)
    feats = None
    if with_features:
        rows = np.arange(N_ITEMS)
        # tags: the cluster's tag plus one tag every item shares; tokens: the cluster's word and the item's own
        tags = sp.csr_matrix(
            (np.ones(2 * N_ITEMS), (np.repeat(rows, 2), np.ravel([[c, CLUSTERS] for c in ITEM_CLUSTER])))
        )
        tokens = sp.csr_matrix(
            (np.ones(2 * N_ITEMS), (np.repeat(rows, 2), np.ravel([[c, 10 + i] for i, c in enumerate(ITEM_CLUSTER)]))),
            shape=(N_ITEMS, 128),
        )
        feats = ItemFeatures(category=ITEM_CLUSTER.astype(np.int64), tags=tags, tokens=tokens)
    return TrainData(
        n_users=CLUSTERS * USERS_PER,
        n_items=N_ITEMS,
        user_idx=np.array(users, dtype=np.int64),
        item_idx=np.array(items, dtype=np.int64),
        timestamp=np.arange(n, dtype=np.int64),
        rating=np.full(n, np.nan),
        item_features=feats,
    )


@pytest.fixture(scope="module")
def data() -> TrainData:
    return _planted()


def _in_cluster_share(model, data: TrainData, k: int = 3) -> float:
    """Share of each user's top-k unseen items that are in the user's own cluster."""
    scores = model.user_vectors() @ model.item_vectors().T
    scores[data.user_idx, data.item_idx] = -np.inf
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float((ITEM_CLUSTER[top] == (np.arange(data.n_users) // USERS_PER)[:, None]).mean())


class NeuralContract(abc.ABC):
    """What the neural models do beyond the recommender contract (tests/contracts): learn
    planted clusters from attributes too, and train without them. A subclass supplies
    `make(seed)` and `learns` (the bar)."""

    learns = 0.8

    @abc.abstractmethod
    def make(self, seed: int = 0): ...

    @pytest.fixture(scope="class")
    def fitted(self, data):
        losses: list[float] = []
        model = self.make().fit(data, callback=lambda epoch, values: losses.append(values["loss"]))
        return model, losses

    def test_learns_planted_clusters_and_loss_decreases(self, fitted, data):
        model, losses = fitted
        assert np.mean(losses[-3:]) < 0.8 * losses[0]
        assert _in_cluster_share(model, data) >= self.learns

    def test_trains_without_item_features(self):
        model = self.make().fit(_planted(with_features=False))
        assert np.isfinite(model.item_vectors()).all()


class TestTwoTower(NeuralContract):
    def make(self, seed: int = 0) -> TwoTower:
        cfg = TwoTowerConfig(dim=16, epochs=25, batch_size=64, learning_rate=0.02, history=5, seed=seed)
        return TwoTower(cfg, device="cpu")

    def test_items_without_events_get_vectors_from_their_attributes(self, fitted):
        model, _ = fitted
        V = model.item_vectors()
        for item, cluster in COLD.items():
            assert np.linalg.norm(V[item]) > 0.5
            sims = np.array([(V[:N_WARM][ITEM_CLUSTER[:N_WARM] == c] @ V[item]).mean() for c in range(CLUSTERS)])
            assert sims.argmax() == cluster, sims
            # users of its cluster score it above users of the others
            by_user = model.user_vectors() @ V[item]
            own = by_user[np.arange(len(by_user)) // USERS_PER == cluster]
            assert own.mean() > by_user[np.arange(len(by_user)) // USERS_PER != cluster].mean()

    def test_user_id_tower_and_bpr_loss_train(self, data):
        cfg = TwoTowerConfig(dim=8, epochs=3, batch_size=64, loss="bpr", user_id=True, history=0, hidden=8)
        model = TwoTower(cfg).fit(data)
        assert np.isfinite(model.user_vectors()).all()


class TestGraphSAGE(NeuralContract):
    def make(self, seed: int = 0) -> GraphSAGE:
        cfg = GraphSAGEConfig(dim=16, fanouts=(4, 3), epochs=30, batch_size=64, learning_rate=0.01, seed=seed)
        return GraphSAGE(cfg, device="cpu", edge_chunk=100)  # several inference chunks on purpose

    def test_trains_on_sampled_subgraphs_smaller_than_the_graph(self, fitted, data):
        model, _ = fitted
        n_nodes = data.n_users + data.n_items
        assert model.subgraph_nodes and max(model.subgraph_nodes) < n_nodes

    def test_inference_chunking_does_not_change_vectors(self, fitted, data):
        model, _ = fitted
        cfg = model.config
        whole = GraphSAGE(cfg, device="cpu", edge_chunk=1 << 20).fit(data)
        assert np.allclose(whole.user_vectors(), model.user_vectors(), atol=1e-5)


class TestLightGCN(NeuralContract):
    def make(self, seed: int = 0) -> LightGCN:
        cfg = LightGCNConfig(dim=16, epochs=40, batch_size=128, learning_rate=0.02, recency_half_life=5, seed=seed)
        return LightGCN(cfg, device="cpu")


def test_neighbour_sampler_takes_real_neighbours_at_most_fanout(data):
    graph = Graph(data, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    seeds = torch.arange(graph.n_nodes)
    nbr, pos = graph.sample(seeds, 3, gen)
    per_seed = torch.bincount(pos, minlength=len(seeds))
    degree = torch.as_tensor(graph.degree)
    assert torch.equal(per_seed, degree.clamp(max=3))
    adjacency = {(int(a), int(b)) for a, b in zip(*np.nonzero(_dense_adjacency(graph)), strict=True)}
    assert all((int(seeds[p]), int(n)) in adjacency for n, p in zip(nbr, pos, strict=True))
    small = torch.nonzero(degree <= 3).squeeze(1)  # all of their neighbours, once each
    for s in small[:5].tolist():
        got = sorted(nbr[pos == s].tolist())
        assert got == sorted(graph.indices[graph.indptr[s] : graph.indptr[s + 1]].tolist())


def _dense_adjacency(graph: Graph) -> np.ndarray:
    A = np.zeros((graph.n_nodes, graph.n_nodes), dtype=bool)
    rows = np.repeat(np.arange(graph.n_nodes), graph.degree)
    A[rows, graph.indices.numpy()] = True
    return A


def test_subgraph_edges_point_into_sampled_nodes(data):
    graph = Graph(data, torch.device("cpu"))
    seeds = torch.tensor([0, 5, data.n_users + 3, 0])
    nodes, edge_index, local = graph.subgraph(seeds, (3, 2), torch.Generator().manual_seed(1))
    assert torch.equal(nodes[local], seeds)
    assert int(edge_index.max()) < len(nodes) < graph.n_nodes
    A = _dense_adjacency(graph)
    assert A[nodes[edge_index[1]].numpy(), nodes[edge_index[0]].numpy()].all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["two_tower", "graphsage", "lightgcn"])
def test_trains_on_cuda(kind, data):
    cfg = {
        "two_tower": TwoTowerConfig(epochs=2),
        "graphsage": GraphSAGEConfig(epochs=2),
        "lightgcn": LightGCNConfig(epochs=2),
    }
    model = build_by_kind(kind, cfg[kind].model_dump(), device=torch.device("cuda")).fit(data)
    assert np.isfinite(model.user_vectors()).all() and _in_cluster_share(model, data) > 0.25


@pytest.mark.parametrize("kind", ["two_tower", "graphsage", "lightgcn"])
def test_tenant_files_choose_the_neural_kinds(kind):
    from pipeline.config import TenantConfig
    from pipeline.config.models import MODEL_QUEUES

    doc = {"tenant": "acme", "source": {"uri": "x.csv"}, "model": {"kind": kind, "epochs": 3}}
    cfg = TenantConfig.model_validate(doc)
    assert cfg.model.kind == kind and cfg.model.epochs == 3 and MODEL_QUEUES[kind] == "gpu"


def test_two_tower_user_tower_needs_an_input():
    with pytest.raises(ValueError, match="history > 0 or user_id"):
        TwoTowerConfig(history=0)
    assert GraphSAGEConfig.model_validate({"fanouts": [5, 5, 5]}).fanouts == (5, 5, 5)
