"""Synthetic tenants with a realistic long tail and real structure (for tests and benchmarks).

Users and items live in a few latent taste clusters; item popularity is Zipf-like and user
activity log-normal; each user's events are drawn (without replacement, by Gumbel top-k)
from popularity x taste, and timestamps drift so a user's later events lean to their
cluster's newer items. A factor model therefore beats popularity, as on real data.

`sequential` plants next-item structure on top: every item has one fixed successor (a random
permutation), and each event after a user's first is, with that probability, the successor of
their previous event instead of a taste draw (later repeats of a pair are dropped). What
follows a user's latest item is then predictable from that item alone: the case sequential
models exist for, and one a factor model over the user's whole history only partly sees.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def interactions(
    n_users: int = 300,
    n_items: int = 200,
    mean_events: float = 20.0,
    clusters: int = 6,
    seed: int = 0,
    start: str = "2025-01-01",
    days: int = 90,
    block: int = 4096,
    sequential: float = 0.0,
) -> pd.DataFrame:
    if not 0.0 <= sequential <= 1.0:
        raise ValueError(f"sequential must be a probability in [0, 1], got {sequential}")
    rng = np.random.default_rng(seed)
    planted = np.random.default_rng([seed, 1])  # its own stream: sequential=0 leaves the data as it was
    successor = planted.permutation(n_items)
    user_cluster = rng.integers(0, clusters, n_users)
    item_cluster = rng.integers(0, clusters, n_items)
    pop = 1.0 / np.power(rng.permutation(n_items) + 1.0, 0.8)
    log_pop = np.log(pop / pop.sum())
    n_events = np.clip(rng.lognormal(np.log(mean_events), 0.6, n_users).astype(int), 3, max(3, n_items // 2))
    frames = []
    t0 = pd.Timestamp(start, tz="UTC").value // 10**9
    for b0 in range(0, n_users, block):  # blocks of users, vectorised inside
        b1 = min(b0 + block, n_users)
        affinity = np.where(user_cluster[b0:b1, None] == item_cluster[None, :], 2.5, 0.0)
        gumbel = rng.gumbel(size=(b1 - b0, n_items))
        order = np.argsort(-(log_pop[None, :] + affinity + gumbel), axis=1)
        counts = n_events[b0:b1]
        if sequential > 0:  # position by position (vectorised over the block's users)
            order = order[:, : counts.max()]
            for t in range(1, order.shape[1]):
                follow = planted.random(b1 - b0) < sequential
                order[follow, t] = successor[order[follow, t - 1]]
        mask = np.arange(n_items)[None, :] < counts[:, None]
        rows, pos = np.nonzero(mask)
        items = order[rows, pos]
        # later positions are less "core" to the user's taste: spread them over time, ordered
        frac = (pos + rng.random(len(pos))) / counts[rows]
        ts = t0 + (frac * days * 86_400).astype(np.int64)
        frames.append(pd.DataFrame({"user_id": (rows + b0), "item_id": items, "timestamp": ts}))
    df = pd.concat(frames, ignore_index=True)
    if sequential > 0:
        df = df.sort_values(["user_id", "timestamp"], kind="stable").drop_duplicates(["user_id", "item_id"])
    df["user_id"] = "u" + df["user_id"].astype(str)
    df["item_id"] = "i" + df["item_id"].astype(str)
    df["rating"] = rng.integers(1, 6, len(df)).astype(float)
    return df.sort_values(["timestamp", "user_id", "item_id"], kind="stable").reset_index(drop=True)
