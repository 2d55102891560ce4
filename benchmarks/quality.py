"""Quality on MovieLens-100K through the pipeline's own split and metrics; writes JSON.

    .venv/bin/python benchmarks/quality.py [--out benchmarks/results/quality.json] [--implicit]

The split and ranking are exactly the pipeline's (features stage: per-user temporal 80/20;
evaluate: full ranking excluding training items). `--implicit` also tunes the `implicit`
library's ALS on a small grid scored on the SAME holdout (generous to it: tuned on test);
install it only for the benchmark (`pip install implicit`), the product does not need it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from pipeline import evaluate, extract, features
from pipeline.config import Settings, load_tenant_file
from pipeline.config.tenant import ALSConfig
from pipeline.context import RunContext
from pipeline.data import demo
from pipeline.models import TrainData
from pipeline.models.als import ALS
from pipeline.models.popularity import Popularity

ROOT = Path(__file__).resolve().parents[1]


def _score(name, user_vectors, item_vectors, feats, seconds, params=None):
    summary, _, _ = evaluate.evaluate_vectors(user_vectors, item_vectors, feats.relevant(), feats.matrix(False), 10)
    row = {"model": name, **evaluate.at_k(summary, 10), "fit_seconds": round(seconds, 2), "params": params or {}}
    print(f"{name:<28} ndcg@10 {row['ndcg@10']:.4f}  recall@10 {row['recall@10']:.4f}  fit {seconds:.1f}s", flush=True)
    return row


def _implicit_rows(train, feats):
    import implicit
    import scipy.sparse as sp
    from threadpoolctl import threadpool_limits

    m = sp.csr_matrix(
        (np.ones(len(train.user_idx), np.float32), (train.user_idx, train.item_idx)),
        shape=(train.n_users, train.n_items),
    )
    m.data[:] = 1.0
    best, rows = None, []
    for factors, reg, alpha in itertools.product([64, 128], [0.1, 1.0, 10.0], [1.0, 5.0, 20.0]):
        with threadpool_limits(1, "blas"):
            model = implicit.cpu.als.AlternatingLeastSquares(
                factors=factors, regularization=reg, alpha=alpha, iterations=15, random_state=0
            )
            t = time.perf_counter()
            model.fit(m, show_progress=False)
            secs = time.perf_counter() - t
        row = _score(
            f"implicit-als f{factors} r{reg} a{alpha}",
            model.user_factors,
            model.item_factors,
            feats,
            secs,
            {"factors": factors, "regularization": reg, "alpha": alpha, "iterations": 15},
        )
        rows.append(row)
        best = row if best is None or row["ndcg@10"] > best["ndcg@10"] else best
    return best, rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quality.json"))
    parser.add_argument("--implicit", action="store_true", help="also tune implicit's ALS (pip install implicit)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(home=Path(tmp), data_root=ROOT, mlflow_tracking_uri=f"sqlite:///{tmp}/m.db")
        demo.prepare(ROOT / "data" / "demo", ROOT / "var" / "cache")
        cfg = load_tenant_file(ROOT / "include" / "tenants" / "demo.yaml")
        ctx = RunContext(config=cfg, interval_end=datetime(2026, 1, 1, tzinfo=UTC), settings=settings)
        extract.extract(ctx)
        features.features(ctx)
        feats = features.load(ctx)
    train = TrainData.from_events(feats.split(False), feats.n_users, feats.n_items)
    rows = []
    t = time.perf_counter()
    pop = Popularity().fit(train)
    rows.append(_score("popularity", pop.user_vectors(), pop.item_vectors(), feats, time.perf_counter() - t))
    variants = {
        "als (default config)": ALSConfig(),
        "als, no recency": ALSConfig(recency_half_life=None, fold_in_half_life=None),
        "als, plain (no recency, no WR)": ALSConfig(
            recency_half_life=None, fold_in_half_life=None, reg_exponent=0.0, regularization=10.0, alpha=0.3
        ),
    }
    for name, als_cfg in variants.items():
        ndcgs = []
        for seed in (0, 1, 2):
            t = time.perf_counter()
            model = ALS(als_cfg.model_copy(update={"seed": seed})).fit(train)
            row = _score(
                f"{name} seed {seed}",
                model.user_vectors(),
                model.item_vectors(),
                feats,
                time.perf_counter() - t,
                als_cfg.model_dump() | {"seed": seed},
            )
            rows.append(row)
            ndcgs.append(row["ndcg@10"])
        print(f"{name:<28} mean ndcg@10 {np.mean(ndcgs):.4f} +- {np.std(ndcgs):.4f}")
    result = {
        "dataset": "MovieLens-100K (recbole 1.2.1 wheel)",
        "split": "per-user temporal, last 20% of each user's events held out; full ranking, train items excluded",
        "users_evaluated": int((np.diff(feats.relevant().indptr) > 0).sum()),
        "machine": {
            "python": platform.python_version(),
            "processor": platform.processor(),
            "cpus": __import__("os").cpu_count(),
        },
        "rows": rows,
    }
    if args.implicit:
        best, implicit_rows = _implicit_rows(train, feats)
        result["implicit_best"] = best
        result["rows"] += implicit_rows
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
