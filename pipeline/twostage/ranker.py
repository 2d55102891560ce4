"""Stage two: a LightGBM LambdaRank model over the candidate features.

Why LightGBM and not a small torch model: on ML-100K (benchmarks/quality.py, two-stage
rows) LambdaRank on these features beat a 2-layer torch MLP with a listwise softmax loss,
trains in seconds on one thread, needs no feature scaling (counts, ages and scores of very
different ranges, NaN for "not proposed" handled natively), and scores a few hundred
candidates in well under a millisecond. Persisted in LightGBM's own text format
(`model_to_string`), no pickle; the release checksums it like every file.
"""

from __future__ import annotations

import numpy as np

from pipeline.config.twostage import RankerConfig


def _params(cfg: RankerConfig) -> dict:
    return {
        "objective": "lambdarank",
        "metric": "ndcg",
        "eval_at": [10],
        "learning_rate": cfg.learning_rate,
        "num_leaves": cfg.leaves,
        "min_data_in_leaf": cfg.min_data_in_leaf,
        "num_threads": cfg.threads,
        "seed": cfg.seed,
        "deterministic": True,
        "force_row_wise": True,
        "verbosity": -1,
    }


class Ranker:
    """A fitted LambdaRank booster plus the feature names it was trained with."""

    def __init__(self, booster, feature_names: list[str], report: dict | None = None) -> None:
        self.booster = booster
        self.feature_names = feature_names
        self.report = report or {}

    @classmethod
    def train(
        cls, X: np.ndarray, y: np.ndarray, group_sizes: np.ndarray, feature_names: list[str], cfg: RankerConfig
    ) -> Ranker:
        """Fit on rows grouped by user (`group_sizes` consecutive rows each); a seeded share of the
        groups is held out for early stopping on NDCG@10."""
        import lightgbm as lgb

        rng = np.random.default_rng(cfg.seed)
        n_groups = len(group_sizes)
        held = rng.random(n_groups) < cfg.early_stopping_fraction if n_groups > 4 else np.zeros(n_groups, bool)
        row_group = np.repeat(np.arange(n_groups), group_sizes)
        fit_rows, val_rows = ~held[row_group], held[row_group]
        params = _params(cfg)
        train_set = lgb.Dataset(
            X[fit_rows], y[fit_rows], group=group_sizes[~held], feature_name=feature_names, free_raw_data=True
        )
        valid, callbacks = [], []
        if held.any():
            valid = [lgb.Dataset(X[val_rows], y[val_rows], group=group_sizes[held], reference=train_set)]
            callbacks = [lgb.early_stopping(cfg.early_stopping_rounds, verbose=False)]
        booster = lgb.train(params, train_set, num_boost_round=cfg.trees, valid_sets=valid, callbacks=callbacks)
        best = booster.best_iteration or cfg.trees
        score = booster.best_score.get("valid_0", {}).get("ndcg@10") if held.any() else None
        report = {
            "trees": int(best),
            "groups": int(n_groups),
            "rows": int(len(y)),
            "positives": int(y.sum()),
            "early_stopping_ndcg@10": None if score is None else round(float(score), 6),
        }
        return cls(booster, feature_names, report)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """float64 scores, one per row (higher = better)."""
        if not len(X):
            return np.empty(0)
        return self.booster.predict(X, num_threads=1)

    def to_text(self) -> str:
        return self.booster.model_to_string(num_iteration=self.report.get("trees"))

    @classmethod
    def from_text(cls, text: str) -> Ranker:
        import lightgbm as lgb

        booster = lgb.Booster(model_str=text)
        return cls(booster, list(booster.feature_name()), {"trees": booster.current_iteration()})

    def importance(self) -> dict[str, float]:
        """Total gain per feature, largest first (the run's log and MLflow)."""
        gain = self.booster.feature_importance(importance_type="gain")
        pairs = sorted(zip(self.feature_names, gain, strict=True), key=lambda p: -p[1])
        return {name: round(float(g), 3) for name, g in pairs}
