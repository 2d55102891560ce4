"""Users as sequences of items, and the SASRec encoder in numpy (what serving runs).

A user's sequence is their distinct items ordered by their last event, oldest first: exactly the
release's seen list (newest first, ties by item index; release/publish.py) reversed, so the
sequence the model was trained and refit on is the one serving reads back from `seen:` keys and
fold-ins. `SequenceEncoder` is the forward pass of pipeline/models/sasrec.py over one user's
recent items, in numpy (serving imports no torch); a test holds the two equal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipeline.models.base import TrainData

LN_EPS = 1e-5  # torch.nn.LayerNorm's default, which the trainer uses
PREFIX = "encoder."  # state keys of the encoder's weights (beside user_vectors and item_vectors)


def chronological(data: TrainData) -> tuple[np.ndarray, np.ndarray]:
    """(indptr [n_users + 1], items): each user's distinct items by last event, oldest first."""
    order = np.lexsort((-data.item_idx, data.timestamp, data.user_idx))
    user, item, ts = data.user_idx[order], data.item_idx[order], data.timestamp[order]
    # keep each (user, item)'s last event: the next row of the same pair in this order is later
    key = user * np.int64(data.n_items) + item
    by_pair = np.lexsort((np.arange(len(key)), key))
    last = np.ones(len(key), dtype=bool)
    same = key[by_pair][1:] == key[by_pair][:-1]
    last[by_pair[:-1][same]] = False
    user, item, ts = user[last], item[last], ts[last]
    counts = np.bincount(user, minlength=data.n_users)
    return np.concatenate(([0], np.cumsum(counts))).astype(np.int64), item.astype(np.int64)


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + LN_EPS) * weight + bias


@dataclass(frozen=True)
class SequenceEncoder:
    """The trained encoder's weights (float32) and shape; `encode` is one user's vector."""

    weights: dict[str, np.ndarray]  # torch state_dict names without PREFIX
    item_vectors: np.ndarray  # [n_items, d]: the input embedding, tied to the output
    heads: int
    layers: int

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray], heads: int) -> SequenceEncoder:
        weights = {k[len(PREFIX) :]: np.asarray(v, dtype=np.float32) for k, v in state.items() if k.startswith(PREFIX)}
        layers = len({k.split(".")[1] for k in weights if k.startswith("blocks.")})
        return cls(weights, np.asarray(state["item_vectors"], dtype=np.float32), heads, layers)

    @property
    def max_len(self) -> int:
        return int(self.weights["position.weight"].shape[0])

    def encode(self, history: np.ndarray) -> np.ndarray:
        """float32 [d]: the user vector from their distinct item rows, NEWEST FIRST (a seen list)."""
        w, d = self.weights, self.item_vectors.shape[1]
        rows = np.asarray(history, dtype=np.int64)[: self.max_len][::-1]  # oldest first
        n = len(rows)
        if n == 0:
            return np.zeros(d, dtype=np.float32)
        x = self.item_vectors[rows] * math.sqrt(d) + w["position.weight"][np.arange(n - 1, -1, -1)]
        causal = np.triu(np.ones((n, n), dtype=bool), 1)  # True: a later item, not attended to
        dh = d // self.heads
        for b in range(self.layers):
            p = f"blocks.{b}."
            last = b == self.layers - 1  # only the newest position's output is needed from the last block
            h = _layer_norm(x, w[p + "ln1.weight"], w[p + "ln1.bias"])
            qkv = (h @ w[p + "qkv.weight"].T + w[p + "qkv.bias"]).reshape(n, 3, self.heads, dh).transpose(1, 2, 0, 3)
            q, k, v = qkv[0][:, -1:] if last else qkv[0], qkv[1], qkv[2]  # [heads, queries, dh]
            scores = q @ k.transpose(0, 2, 1) / math.sqrt(dh)
            if not last:
                scores = np.where(causal[None], -np.inf, scores)
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            att = (scores / scores.sum(-1, keepdims=True)) @ v  # [heads, queries, dh]
            x = (x[-1:] if last else x) + att.transpose(1, 0, 2).reshape(-1, d) @ w[p + "proj.weight"].T
            x = x + w[p + "proj.bias"]
            h = _layer_norm(x, w[p + "ln2.weight"], w[p + "ln2.bias"])
            hidden = np.maximum(h @ w[p + "ff1.weight"].T + w[p + "ff1.bias"], 0.0)
            x = x + hidden @ w[p + "ff2.weight"].T + w[p + "ff2.bias"]
        return _layer_norm(x[-1], w["norm.weight"], w["norm.bias"]).astype(np.float32)
