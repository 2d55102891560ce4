"""Score blends on the pipeline's split: do signals the default ALS lacks lift it toward issue 18's 0.285?

    PYTHONPATH=. .venv/bin/python benchmarks/quality_blends.py [--datasets ml-100k,ml-1m,synthetic-seq]
        [--ml1m-users 1000] [--sasrec] [--out benchmarks/results/quality_blends.json]

Same features tables, split and metrics as benchmarks/quality.py (per-user temporal 80/20, full
ranking, train items excluded; ALS fitted with the catalog on ML-100K, as the train stage fits
it). Every component is a dense [users, items] score matrix standardised per user (z-scores),
so weights mean the same thing for every user:

* als: the default ALS config, seeds 0, 1, 2 (every blend row is the mean over the three);
* knn_recent: cosine item-kNN (all neighbours) summed over the user's items, each weighted
  0.5 ** (position / 5), newest first (what the two-stage co-occurrence source scores);
* next_items: ridge regression B from each user's earlier items to their later ones, the
  history cut at 50/60/70/80/90% (lambda 1000; items tied in time with the cut count as
  later: an order within one second is not the user's); score X[u] @ B (SLIST's transition
  part, Choi et al. 2021);
* ease_recent: EASE (lambda 200, dense) over rows weighted 0.5 ** (position / 20);
* time_popularity: item events in the 90 days up to the user's newest event, halving per 90 days;
* sasrec (`--sasrec`, slow on a CPU): the default SASRec, seed 0.

Weights are chosen on a validation split carved from the TRAIN events (the last 20% of each
user's train events: pipeline/twostage/model.py `carve`), never on the holdout: per component
the best of WEIGHTS for `als + w * component`, and "als + all" greedily, one component at a
time in the order above, each weight (0 allowed) chosen on validation with the earlier ones
fixed. Rows report validation and holdout NDCG@10. A research harness, not a product path:
a blend that wins here still has to become a configurable, served feature.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from benchmarks import quality
from pipeline.config import Settings, load_tenant_file
from pipeline.config.models import ALSConfig, SASRecConfig
from pipeline.context import RunContext
from pipeline.evaluation import metrics
from pipeline.evaluation.scoring import user_scores
from pipeline.features import dataset
from pipeline.models import TrainData, build
from pipeline.samples import demo
from pipeline.stages import run_all
from pipeline.twostage.model import carve

ROOT = Path(__file__).resolve().parents[1]
SEEDS = (0, 1, 2)
WEIGHTS = (0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0)
CUTS = (0.5, 0.6, 0.7, 0.8, 0.9)
DAY = 86_400.0


def _zs(scores: np.ndarray) -> np.ndarray:
    """Per-user standardisation (rows), float32."""
    s = scores.astype(np.float64)
    return ((s - s.mean(1, keepdims=True)) / (s.std(1, keepdims=True) + 1e-9)).astype(np.float32)


def _binary(data: TrainData) -> sp.csr_matrix:
    m = sp.csr_matrix(
        (np.ones(len(data.user_idx), np.float32), (data.user_idx, data.item_idx)), shape=(data.n_users, data.n_items)
    )
    m.sum_duplicates()
    m.data[:] = 1.0
    return m


def seen_with_times(data: TrainData) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each user's distinct items newest first as CSR (indptr, indices), and each pair's latest
    time aligned with indices (the ordering of pipeline/twostage/candidates.py `seen_newest_first`)."""
    order = np.lexsort((-data.timestamp, data.user_idx))
    u, i = data.user_idx[order], data.item_idx[order]
    _, first = np.unique(u.astype(np.int64) * data.n_items + i, return_index=True)
    keep = np.sort(first)
    indptr = np.concatenate(([0], np.cumsum(np.bincount(u[keep], minlength=data.n_users))))
    return indptr.astype(np.int64), i[keep].astype(np.int64), data.timestamp[order][keep]


def _recent(data: TrainData, half_life: float) -> sp.csr_matrix:
    """users x items: 0.5 ** (position / half_life), position 0 = the newest distinct item."""
    indptr, indices, _ = seen_with_times(data)
    lengths = np.diff(indptr)
    pos = np.arange(len(indices)) - np.repeat(indptr[:-1], lengths)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    return sp.csr_matrix((0.5 ** (pos / half_life), (rows, indices)), shape=(data.n_users, data.n_items))


def knn_recent(data: TrainData) -> np.ndarray:
    X = _binary(data)
    G = (X.T @ X).toarray().astype(np.float64)
    norm = np.sqrt(np.maximum(np.diag(G), 1.0))
    S = G / norm[:, None] / norm[None, :]
    np.fill_diagonal(S, 0.0)
    return np.asarray(_recent(data, 5.0) @ S)


def ease_recent(data: TrainData, lam: float = 200.0) -> np.ndarray:
    X = _binary(data)
    G = (X.T @ X).toarray().astype(np.float64)
    G[np.diag_indices_from(G)] += lam
    P = np.linalg.inv(G)
    B = -P / np.diag(P)[None, :]
    np.fill_diagonal(B, 0.0)
    return np.asarray(_recent(data, 20.0) @ B)


def next_items(data: TrainData, lam: float = 1000.0) -> np.ndarray:
    """X[u] @ B, B = argmin sum_c |F_c - P_c B|^2 + lam |B|^2 over the cuts (see the module docstring)."""
    indptr, indices, times = seen_with_times(data)  # newest first, each pair's latest time
    lengths, n, m = np.diff(indptr), data.n_users, data.n_items
    users = np.repeat(np.arange(n), lengths)
    has = lengths > 0
    gram, cross = np.zeros((m, m)), np.zeros((m, m))
    for c in CUTS:
        oldest_later = np.floor(c * lengths + 1e-9).astype(np.int64)  # its position, oldest first
        cut_time = np.full(n, np.inf)
        cut_time[has] = times[(indptr[:-1] + lengths - 1 - oldest_later)[has]]
        later = times >= cut_time[users]
        P, F = (
            sp.csr_matrix((np.ones(int(side.sum())), (users[side], indices[side])), shape=(n, m))
            for side in (~later, later)
        )
        gram += (P.T @ P).toarray()
        cross += (P.T @ F).toarray()
    gram[np.diag_indices_from(gram)] += lam
    return np.asarray(_binary(data) @ np.linalg.solve(gram, cross))


def time_popularity(data: TrainData, half_life_days: float = 90.0) -> np.ndarray:
    """Item events before each user's newest event, halving per `half_life_days` (day buckets)."""
    t0 = data.timestamp.min()
    day = ((data.timestamp - t0) // DAY).astype(np.int64)
    n_days = int(day.max()) + 1
    counts = sp.csr_matrix((np.ones(len(day)), (data.item_idx, day)), shape=(data.n_items, n_days)).toarray()
    last = np.zeros(data.n_users, np.int64)
    np.maximum.at(last, data.user_idx, day)
    lag = np.arange(n_days)[None, :] - np.arange(n_days)[:, None]  # [d_event, d_user]
    kernel = np.where(lag >= 0, 0.5 ** (lag / half_life_days), 0.0)
    return (counts @ kernel)[:, last].T


def sasrec(data: TrainData) -> np.ndarray:
    model = build(SASRecConfig(seed=0), "cpu").fit(data)
    return user_scores(model, np.arange(data.n_users))


COMPONENTS: dict[str, Callable[[TrainData], np.ndarray]] = {
    "knn_recent": knn_recent,
    "next_items": next_items,
    "ease_recent": ease_recent,
    "time_popularity": time_popularity,
}


def ndcg(scores: np.ndarray, exclude: sp.csr_matrix, relevant: sp.csr_matrix, k: int = 10) -> float:
    """Mean NDCG@k over users with relevant items (pipeline/evaluation/metrics.py), train items excluded."""
    rows = np.flatnonzero(np.diff(relevant.indptr) > 0)
    block = torch.as_tensor(np.ascontiguousarray(scores[rows], dtype=np.float32))
    ex = exclude[rows].tocoo()
    block[torch.as_tensor(ex.row).long(), torch.as_tensor(ex.col).long()] = float("-inf")
    top = torch.topk(block, k, dim=1).indices.numpy()
    per_user = metrics.per_user_metrics(metrics.hits_matrix(top, rows, relevant), np.diff(relevant.indptr)[rows])
    return float(np.mean(per_user["ndcg"]))


def _features(name: str, tmp: Path, ml1m_users: int) -> tuple[dataset.Features, dataset.ItemFeatures | None]:
    if name != "ml-100k":
        return quality._other_features(name, tmp, ml1m_users)[0], None
    settings = Settings(home=tmp, data_root=ROOT, mlflow_tracking_uri=f"sqlite:///{tmp}/m.db")
    demo.prepare(ROOT / "data" / "demo", ROOT / "var" / "cache")
    cfg = load_tenant_file(ROOT / "include" / "tenants" / "demo.yaml")
    ctx = RunContext(config=cfg, interval_end=datetime(2026, 1, 1, tzinfo=UTC), settings=settings)
    run_all(ctx, until="features")
    return dataset.Features.read(ctx), dataset.read_item_features(ctx)


def run_set(name: str, ml1m_users: int, with_sasrec: bool) -> dict:
    print(f"== {name}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        feats, item_features = _features(name, Path(tmp), ml1m_users)
    train = TrainData.from_events(feats.split(False), feats.n_users, feats.n_items, item_features)
    fit, target = carve(train, 0.2)
    splits = {"validation": (fit, _binary(fit), target), "holdout": (train, feats.matrix(False), feats.relevant())}
    components = dict(COMPONENTS) | ({"sasrec": sasrec} if with_sasrec else {})
    als, comp, seconds = {}, {}, {}
    for split, (data, _, _) in splits.items():
        als[split] = []
        for s in SEEDS:
            model = build(ALSConfig(seed=s), "cpu").fit(data)
            als[split].append(_zs(model.user_vectors() @ model.item_vectors().T))
        for c, fn in components.items():
            t = time.perf_counter()
            comp[(split, c)] = _zs(fn(data))
            seconds[c] = round(seconds.get(c, 0.0) + time.perf_counter() - t, 1)

    def score(split: str, weights: dict[str, float]) -> float:
        _, exclude, relevant = splits[split]
        extra = sum((w * comp[(split, c)] for c, w in weights.items() if w), np.zeros(1, np.float32))
        return float(np.mean([ndcg(a + extra, exclude, relevant) for a in als[split]]))

    rows = [{"model": "als (default config)", "weights": {}}]
    for c in components:
        _, exclude, relevant = splits["holdout"]
        alone = ndcg(comp[("holdout", c)], exclude, relevant)
        best = max(WEIGHTS, key=lambda w, c=c: score("validation", {c: w}))
        rows.append({"model": f"als + {c}", "weights": {c: best}, f"{c} alone, holdout": round(alone, 4)})
    chosen: dict[str, float] = {}
    for c in components:  # greedy, in order, each weight chosen on validation with the earlier ones fixed
        chosen[c] = max((0.0, *WEIGHTS), key=lambda w, c=c: score("validation", chosen | {c: w}))
    rows.append({"model": "als + all (greedy on validation)", "weights": dict(chosen)})
    for row in rows:
        row["validation ndcg@10"] = round(score("validation", row["weights"]), 4)
        row["holdout ndcg@10"] = round(score("holdout", row["weights"]), 4)
        print(f"{row['model']:<36} {json.dumps(row['weights']):<90} val {row['validation ndcg@10']:.4f}  "
              f"holdout {row['holdout ndcg@10']:.4f}", flush=True)  # fmt: skip
    return {"users": feats.n_users, "items": feats.n_items, "component_seconds": seconds, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--datasets", default="ml-100k", help="comma list of ml-100k, ml-1m, synthetic-seq")
    parser.add_argument("--ml1m-users", type=int, default=1000, help="ml-1m: a seeded sample of this many users")
    parser.add_argument("--sasrec", action="store_true", help="add the SASRec component (minutes per fit on a CPU)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quality_blends.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = {name: run_set(name, args.ml1m_users, args.sasrec) for name in args.datasets.split(",") if name}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
