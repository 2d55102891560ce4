"""Experiment analysis, measured: false-positive rate of A/A splits and power by true lift
(per-user delta method, as the report computes it; and, for contrast, a naive per-impression
binomial interval), plus one simulated experiment through the real API with its report.

    PYTHONPATH=. .venv/bin/python benchmarks/experiments.py [--seeds 2000] [--out benchmarks/results/experiments.json]

Population model: each user has their own click propensity (Beta(2, 18): mean 10%, widely
spread) and 1 + Poisson(3) impressions; a treatment multiplies propensities by the lift.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from pipeline.experiments import analysis

ROOT = Path(__file__).resolve().parents[1]


def population(rng: np.random.Generator, n: int, arm: str, lift: float = 1.0) -> pd.DataFrame:
    impressions = 1 + rng.poisson(3, n)
    p = np.clip(rng.beta(2, 18, n) * lift, 0, 1)
    return pd.DataFrame(
        {"user_id": np.arange(n), "arm": arm, "impressions": impressions, "clicks": rng.binomial(impressions, p),
         "conversions": rng.binomial(1, np.clip(0.05 * lift, 0, 1), n)}
    )  # fmt: skip


def naive_significant(df: pd.DataFrame) -> bool:
    """A per-impression two-proportion z-test: what ignoring the user as the unit gives."""
    a, b = (df[df["arm"] == x] for x in ("a", "b"))
    ca, na, cb, nb = a["clicks"].sum(), a["impressions"].sum(), b["clicks"].sum(), b["impressions"].sum()
    p = (ca + cb) / (na + nb)
    z = (cb / nb - ca / na) / np.sqrt(p * (1 - p) * (1 / na + 1 / nb))
    return bool(abs(z) > stats.norm.ppf(0.975))


def rates(seeds: int, n: int, lift: float) -> dict:
    delta = naive = 0
    for seed in range(seeds):  # independent simulated experiments
        rng = np.random.default_rng(seed)
        df = pd.concat([population(rng, n, "a"), population(rng, n, "b", lift)], ignore_index=True)
        verdict = analysis.analyse(df, ["a", "b"], {"a": 0.5, "b": 0.5}, "a")["arms"][1]["verdict"]
        delta += verdict != analysis.NOT_YET if lift == 1.0 else verdict == analysis.WINNER
        naive += naive_significant(df)
    return {"users_per_arm": n, "lift": lift, "seeds": seeds, "per_user_delta": delta / seeds, "naive": naive / seeds}


def through_the_api(n_users: int = 1600) -> dict:
    """One experiment served by the real app: noisy live release vs the true-taste release."""
    from fastapi.testclient import TestClient

    from pipeline.config import Settings, load_tenant
    from pipeline.experiments import report
    from pipeline.experiments.cli import text
    from pipeline.index import build as faiss_index
    from pipeline.index import search as ann
    from pipeline.release import format as rel
    from pipeline.serving.app import create_app
    from pipeline.storage import open_store

    root = Path(tempfile.mkdtemp(prefix="bench-experiments-"))
    (root / "tenants").mkdir()
    settings = Settings(home=root, artifact_root=str(root / "a"), tenants_dir=root / "tenants", redis_url=None,
                        auth_disabled=True, rate_limit="", tenant_work_limit="", release_poll_seconds=0,
                        impressions_flush_seconds=0.05, mlflow_tracking_uri=f"sqlite:///{root / 'm.db'}")  # fmt: skip
    store = open_store(settings.artifact_root)
    rng = np.random.default_rng(0)
    users = rng.standard_normal((n_users, 8)).astype(np.float32)
    items = rng.standard_normal((300, 8)).astype(np.float32)
    liked = np.zeros((n_users, 300), dtype=bool)
    np.put_along_axis(liked, np.argsort(-(users @ items.T), axis=1)[:, :30], True, axis=1)

    def publish(vectors: np.ndarray, end: str, seed: int) -> str:
        files = rel.files_from_vectors(
            [f"u{i}" for i in range(n_users)], [f"i{j}" for j in range(300)], users, vectors,
            np.arange(n_users + 1, dtype=np.int64), (np.arange(n_users) * 7 % 300).astype(np.int32),
            index_bytes=ann.serialize(faiss_index.build_index(vectors)[0]), model_meta={"kind": "bench", "seed": seed},
        )  # fmt: skip
        return rel.publish_release(store, "sim", files, {"run_id": f"r{seed}", "data_interval_end": end}).release_id

    publish((items + 1.5 * rng.standard_normal(items.shape)).astype(np.float32), "2026-03-02T00:00:00+00:00", 1)
    better = publish(items, "2026-03-01T00:00:00+00:00", 2)
    arms = [{"name": "control", "share": 0.5}, {"name": "treatment", "share": 0.5, "release": better}]
    tenant = {"tenant": "sim", "source": {"uri": "x.csv"}, "experiments": [{"name": "ranker", "arms": arms}]}
    (root / "tenants" / "sim.yaml").write_text(json.dumps(tenant))
    started = time.perf_counter()
    with TestClient(create_app(settings)) as client:
        client.app.state.variants.refresh("sim")
        events = []
        for u in range(n_users):  # the simulated population, one request each
            body = client.get(f"/v1/tenants/sim/users/u{u}/recommendations").json()
            rows = np.array([int(i["item_id"][1:]) for i in body["items"]])
            p = np.where(liked[u, rows], 0.35, 0.03) / np.sqrt(1 + np.arange(len(rows)))
            events += [
                {"user_id": f"u{u}", "item_id": body["items"][k]["item_id"], "event_type": "click",
                 "recommendation_id": body["recommendation_id"], "position": int(k)}
                for k in np.flatnonzero(rng.random(len(rows)) < p)
            ]  # fmt: skip
        for s in range(0, len(events), 500):
            client.post("/v1/tenants/sim/events", json={"events": events[s : s + 500]})
    seconds = time.perf_counter() - started
    doc = report.build(store, load_tenant("sim", settings.tenants_dir), "ranker", datetime.now(UTC) + timedelta(days=1))
    return {"users": n_users, "seconds": round(seconds, 1), "report": doc, "text": text(doc)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=2000)
    parser.add_argument("--api-only", action="store_true", help="only the experiment through the API")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "experiments.json"))
    args = parser.parse_args()
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())  # fmt: skip
    started = time.perf_counter()
    out = {
        "machine": {"cpu_model": cpu, "cpus": os.cpu_count(), "threads": 1, "python": platform.python_version()},
        "api": through_the_api(),
    }
    if not args.api_only:
        out["aa"] = rates(args.seeds, 1000, 1.0)
        out["power"] = [rates(max(args.seeds // 5, 100), 2000, lift) for lift in (1.05, 1.10, 1.15, 1.20)]
    out["seconds"] = round(time.perf_counter() - started, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2, default=str))
    print(json.dumps({k: v for k, v in out.items() if k != "api"}, indent=2))
    print(out["api"]["text"])


if __name__ == "__main__":
    main()
