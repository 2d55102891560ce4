"""The two-stage rows of benchmarks/quality.py: LightGBM LambdaRank (the product's ranker) and,
for the choice, a small torch MLP trained with a listwise softmax loss on the same features.

Both learn from the same training set (pipeline/twostage/model.py: `training_set`, carved from
the TRAIN split only) and rank the same candidates; only the second stage differs. Also the
in-process cost of one request's second stage (candidates of one user, features, ranker), p50/p99.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from pipeline.config.twostage import TwoStageConfig
from pipeline.evaluation import metrics
from pipeline.twostage import model as tsm


class TorchRanker:
    """2-layer MLP over standardised features (NaN -> 0 plus a missing flag), listwise softmax loss per user."""

    def __init__(self, hidden: int = 64, epochs: int = 60, lr: float = 3e-3, seed: int = 0) -> None:
        self.hidden, self.epochs, self.lr, self.seed = hidden, epochs, lr, seed

    def _prep(self, X: np.ndarray) -> torch.Tensor:
        miss = np.isnan(X)
        Z = (np.where(miss, self.mean, X) - self.mean) / self.std
        return torch.as_tensor(np.hstack([Z, miss[:, self.has_missing]]), dtype=torch.float32)

    def fit(self, X: np.ndarray, y: np.ndarray, sizes: np.ndarray) -> TorchRanker:
        torch.manual_seed(self.seed)
        X = np.sign(X) * np.log1p(np.abs(X))  # counts and ages span orders of magnitude
        self.mean, self.std = np.nanmean(X, axis=0), np.nanstd(X, axis=0) + 1e-6
        self.mean, self.std = np.nan_to_num(self.mean), np.nan_to_num(self.std, nan=1.0)
        self.has_missing = np.isnan(X).any(axis=0)
        T = self._prep(X)
        group = torch.as_tensor(np.repeat(np.arange(len(sizes)), sizes))
        target = torch.as_tensor(y)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(T.shape[1], self.hidden), torch.nn.ReLU(), torch.nn.Linear(self.hidden, 1)
        )
        opt = torch.optim.Adam(self.net.parameters(), lr=self.lr, weight_decay=1e-5)
        n = len(sizes)
        for _ in range(self.epochs):  # full batch: the listwise loss needs whole groups
            s = self.net(T).squeeze(1)
            mx = torch.zeros(n).scatter_reduce(0, group, s.detach(), "amax", include_self=False)
            lse = torch.log(torch.zeros(n).index_add(0, group, torch.exp(s - mx[group]))) + mx
            pos = torch.zeros(n).index_add(0, group, target)
            loss = -(torch.zeros(n).index_add(0, group, target * s) - pos * lse).sum() / pos.sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.net(self._prep(np.sign(X) * np.log1p(np.abs(X)))).squeeze(1).numpy()


def _metrics(top: np.ndarray, rows: np.ndarray, relevant) -> dict[str, float]:
    hits = metrics.hits_matrix(top, rows, relevant)
    per_user = metrics.per_user_metrics(hits, np.diff(relevant.indptr)[rows])
    return metrics.summarize(per_user, top, relevant.shape[1])


def rows_for_seed(config: TwoStageConfig, train, relevant, make_model, seed: int) -> dict[str, dict]:
    """{'lightgbm': {...}, 'torch_mlp': {...}} metrics at 10 and seconds, one base-model seed."""
    out = {}
    t = time.perf_counter()
    X, y, sizes, names, counts = tsm.training_set(config, train, make_model)
    prep = time.perf_counter() - t
    base = make_model(train)
    rows = np.flatnonzero(np.diff(relevant.indptr) > 0)
    for name in ("lightgbm", "torch_mlp"):
        t = time.perf_counter()
        if name == "lightgbm":
            from pipeline.twostage.ranker import Ranker

            ranker = Ranker.train(X, y, sizes, names, config.ranker)
        else:
            ranker = TorchRanker(seed=seed).fit(X, y, sizes)
        secs = time.perf_counter() - t
        stage = tsm.TwoStage.build(config, ranker, train, base)  # type: ignore[arg-type]
        out[name] = {**_metrics(stage.recommend(rows, 10), rows, relevant), "fit_seconds": round(prep + secs, 2)}
        out[name]["ranker_seconds"] = round(secs, 2)
        out[name]["training_set"] = counts
        if name == "lightgbm":
            out[name]["latency_ms"] = request_cost(stage, rows)
    return out


def request_cost(stage: tsm.TwoStage, rows: np.ndarray, n: int = 300) -> dict[str, float]:
    """ms per single-user second stage (candidates, features, ranker), in-process, one thread."""
    times = []
    for u in rows[:n]:  # one request per user, as serving would call it
        t = time.perf_counter()
        stage.recommend(np.array([u]), 10)
        times.append((time.perf_counter() - t) * 1000)
    return {"p50": round(float(np.percentile(times, 50)), 3), "p99": round(float(np.percentile(times, 99)), 3)}
