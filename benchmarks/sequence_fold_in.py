"""What a SASRec release adds to serving: the per-event cost of re-encoding a user, on the CPU.

    PYTHONPATH=. .venv/bin/python benchmarks/sequence_fold_in.py [--out benchmarks/results/sequence_fold_in.json]

A SASRec release is a dot-product release: a GET costs what any vector model's does (the
user's vector, then candidates.npy or FAISS). What differs is POST /events: serving runs the
encoder (pipeline/models/sequence.py, numpy) over the user's new seen list, where ALS solves
its normal equations (models/als_fold.py). Both are timed here, one thread, per call, on the
default SASRec config's shapes (64 dims, 2 layers, 50 items) with untrained weights (the cost
does not depend on their values), for seen lists of several lengths, 50k items. BLAS runs on
one thread (set before numpy loads): tiny matrices gain nothing from more, and on a busy machine
a multi-threaded BLAS call waits for every thread it wakes (tens of ms).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # before numpy loads its BLAS
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.config.models import ALSConfig, SASRecConfig  # noqa: E402
from pipeline.models import als_fold  # noqa: E402
from pipeline.models.sasrec import SASRecNet  # noqa: E402
from pipeline.models.sequence import PREFIX, SequenceEncoder  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
N_ITEMS = 50_000


def _per_call_us(fn, repeats: int) -> dict[str, float]:
    for _ in range(20):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e6)
    q = np.percentile(times, [50, 99])
    return {"p50_us": round(float(q[0]), 1), "p99_us": round(float(q[1]), 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sequence_fold_in.json"))
    parser.add_argument("--repeats", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = SASRecConfig()
    net = SASRecNet(N_ITEMS, cfg)
    V = net.items.weight[:N_ITEMS].detach().numpy().copy()
    state = {PREFIX + k: v.detach().numpy() for k, v in net.state_dict().items() if not k.startswith("items.")}
    encoder = SequenceEncoder.from_state({**state, "item_vectors": V}, cfg.heads)
    als = ALSConfig()
    Y = np.random.default_rng(0).standard_normal((N_ITEMS, als.factors)).astype(np.float32) * 0.1
    gram = Y.astype(np.float64).T @ Y.astype(np.float64)
    rng = np.random.default_rng(1)
    rows = []
    for length in (1, 10, 50, 200):
        history = rng.choice(N_ITEMS, length, replace=False)
        counts = np.ones(length)
        row = {
            "seen_items": length,
            "sasrec_encode": _per_call_us(lambda h=history: encoder.encode(h), args.repeats),
            "als_fold_in": _per_call_us(
                lambda h=history, c=counts: als_fold.fold_in_user(Y, gram, h, c, als), args.repeats
            ),
        }
        print(row, flush=True)
        rows.append(row)
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    cpu = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), "")
    result = {
        "what": "per-call cost of a user's fold-in on POST /events, one thread",
        "config": {"sasrec": cfg.model_dump(mode="json"), "als_factors": als.factors, "items": N_ITEMS},
        "machine": {"cpu_model": cpu, "threads": 1, "cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0]},
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
