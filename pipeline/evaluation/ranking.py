"""Batched top-K over all items with per-user exclusions (torch; CPU or CUDA).

Scores are dot products of user and item vectors, computed a block of users at a time so
memory stays at block x n_items; excluded items (already seen, or unknown to a model) are
masked to -inf before topk. This is the one ranking routine evaluation and the gate share;
`topk_scores` is the same loop for models that score a block of users directly (EASE, item-kNN).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.sparse as sp
import torch


def topk_dot(
    user_vectors: np.ndarray,
    item_vectors: np.ndarray,
    k: int,
    exclude: sp.csr_matrix | None = None,
    item_allowed: np.ndarray | None = None,
    block: int = 2048,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Indices [n_users, k] of the best items per row of `user_vectors` (rows of `exclude` align).

    Slots left when fewer than k items are allowed hold -1.
    """
    items = torch.as_tensor(np.ascontiguousarray(item_vectors), dtype=torch.float32, device=device)

    def scores(start: int, stop: int) -> torch.Tensor:
        users = torch.as_tensor(np.ascontiguousarray(user_vectors[start:stop]), dtype=torch.float32, device=device)
        return users @ items.T

    return topk_scores(scores, len(user_vectors), len(item_vectors), k, exclude, item_allowed, block, device)


def topk_scores(
    scores: Callable[[int, int], torch.Tensor | np.ndarray],
    n_users: int,
    n_items: int,
    k: int,
    exclude: sp.csr_matrix | None = None,
    item_allowed: np.ndarray | None = None,
    block: int = 2048,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Like `topk_dot` for any scorer: `scores(start, stop)` is the dense [stop - start, n_items]
    block of rows start:stop (e.g. EASE's X[rows] @ B). Same masking, ties and -1 padding."""
    k = min(k, n_items)
    penalty = None
    if item_allowed is not None:
        penalty = torch.zeros(n_items, device=device)
        penalty[torch.as_tensor(~item_allowed, device=device)] = float("-inf")
    out = np.empty((n_users, k), dtype=np.int64)
    with torch.inference_mode():
        for start in range(0, n_users, block):
            stop = min(start + block, n_users)
            block_scores = torch.as_tensor(scores(start, stop), dtype=torch.float32, device=device)
            if penalty is not None:
                block_scores += penalty
            if exclude is not None:
                sub = exclude[start:stop].tocoo()
                block_scores[
                    torch.as_tensor(sub.row, device=device).long(), torch.as_tensor(sub.col, device=device).long()
                ] = float("-inf")
            best = torch.topk(block_scores, k, dim=1)
            idx = best.indices.masked_fill(torch.isneginf(best.values), -1)  # fewer than k allowed
            out[start:stop] = idx.cpu().numpy()
    return out
