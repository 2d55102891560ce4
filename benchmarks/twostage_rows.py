"""The two-stage rows of benchmarks/quality.py: the product's ranker (a small MLP, listwise
softmax loss: pipeline/twostage/ranker.py) and, for the choice, LightGBM LambdaRank on the same
training set (`lightgbm` from requirements-bench.txt; the product does not need it).

Both learn from the same rows (pipeline/twostage/model.py: `training_set`, carved from the
TRAIN split only) and rank the same candidates; only the second stage differs. Also the
in-process cost of one user's second stage (candidates, features, ranker): p50/p99 ms.
"""

from __future__ import annotations

import time

import numpy as np

from pipeline.config.twostage import TwoStageConfig
from pipeline.evaluation import metrics
from pipeline.twostage import model as tsm
from pipeline.twostage.ranker import Ranker


class LambdaRank:
    """LightGBM LambdaRank, early-stopped on NDCG@10 of a seeded fifth of the users."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def fit(self, X: np.ndarray, y: np.ndarray, sizes: np.ndarray) -> LambdaRank:
        import lightgbm as lgb

        held = np.random.default_rng(self.seed).random(len(sizes)) < 0.2
        rows = held[np.repeat(np.arange(len(sizes)), sizes)]
        params = {
            "objective": "lambdarank",
            "metric": "ndcg",
            "eval_at": [10],
            "learning_rate": 0.05,
            "num_leaves": 15,
            "min_data_in_leaf": 200,
            "num_threads": 1,
            "seed": self.seed,
            "deterministic": True,
            "force_row_wise": True,
            "verbosity": -1,
        }
        train = lgb.Dataset(X[~rows], y[~rows], group=sizes[~held])
        valid = lgb.Dataset(X[rows], y[rows], group=sizes[held], reference=train)
        self.booster = lgb.train(
            params, train, 300, valid_sets=[valid], callbacks=[lgb.early_stopping(30, verbose=False)]
        )
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.booster.predict(X, num_threads=1)


def _metrics(top: np.ndarray, rows: np.ndarray, relevant) -> dict[str, float]:
    hits = metrics.hits_matrix(top, rows, relevant)
    per_user = metrics.per_user_metrics(hits, np.diff(relevant.indptr)[rows])
    return metrics.summarize(per_user, top, relevant.shape[1])


def rows_for_seed(config: TwoStageConfig, train, relevant, make_model, seed: int) -> dict[str, dict]:
    """{'mlp': (metrics, extras), 'lambdarank': (metrics, extras)} for one base-model seed."""
    out = {}
    t = time.perf_counter()
    X, y, sizes, names, counts = tsm.training_set(config, train, make_model)
    prep = time.perf_counter() - t
    base = make_model(train)
    rows = np.flatnonzero(np.diff(relevant.indptr) > 0)
    for name in ("mlp", "lambdarank"):
        t = time.perf_counter()
        if name == "mlp":
            ranker = Ranker.train(X, y, sizes, names, config.ranker.model_copy(update={"seed": seed}))
        else:
            ranker = LambdaRank(seed).fit(X, y, sizes)
        secs = time.perf_counter() - t
        stage = tsm.TwoStage.build(config, ranker, train, base)  # type: ignore[arg-type]
        summary = _metrics(stage.recommend(rows, 10), rows, relevant)
        extras = {"fit_seconds": round(prep + secs, 2), "ranker_seconds": round(secs, 2), "training_set": counts}
        extras["second_stage_ms"] = request_cost(stage, rows)
        out[name] = (summary, extras)
    return out


def request_cost(stage: tsm.TwoStage, rows: np.ndarray, n: int = 300) -> dict[str, float]:
    """ms per single-user second stage (candidates, features, ranker), in-process, one thread."""
    times = []
    for u in rows[:n]:  # one request per user, as serving would call it
        t = time.perf_counter()
        stage.recommend(np.array([u]), 10)
        times.append((time.perf_counter() - t) * 1000)
    return {"p50": round(float(np.percentile(times, 50)), 3), "p99": round(float(np.percentile(times, 99)), 3)}
