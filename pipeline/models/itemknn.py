"""Item-kNN (Sarwar et al. 2001; Deshpande & Karypis 2004): cosine item-item neighbours.

    s_ij = |U_i & U_j| / (sqrt(|U_i| |U_j|) + shrinkage),   s_ii = 0
(with event weights, the cosine of the item columns of W, each pair's weight at its nonzero:
sum_u w_ui w_uj / (|w_i| |w_j| + shrinkage); the counts above when every weight is 1).
Each item keeps its `neighbours` most similar items (a sparse n_items x n_items matrix S);
score(u, j) = sum over the user's items i of S_ij, i.e. X[u] @ S. The similarity is built a
block of items at a time (sparse co-occurrences -> dense block -> top-k), so memory stays
at block x n_items.

Also the evaluate stage's baseline. Served like EASE: a release carries S, serving sums its
rows over the user's seen items (pipeline/serving/live.py).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from pipeline.config.models import ItemKNNConfig
from pipeline.models.base import ProgressCallback, TrainData
from pipeline.models.itemitem import ItemItemModel, binary_matrix, weighted_matrix


class ItemKNN(ItemItemModel):
    kind = "item_knn"

    def __init__(
        self, config: ItemKNNConfig | None = None, device: str | torch.device = "cpu", block_floats: int = 1 << 24
    ) -> None:
        self.config = config or ItemKNNConfig()
        self.device = torch.device(device)
        self.block_floats = block_floats

    def fit(self, data: TrainData, callback: ProgressCallback | None = None) -> ItemKNN:
        cfg, dev, n = self.config, self.device, data.n_items
        X, W = binary_matrix(data), weighted_matrix(data)
        Wt = sp.csr_matrix(W.T)
        norm = torch.as_tensor(
            np.sqrt(np.asarray(Wt.multiply(Wt).sum(axis=1)).ravel()), dtype=torch.float32, device=dev
        )
        k = min(cfg.neighbours, max(n - 1, 1))
        step = max(1, self.block_floats // max(n, 1))
        rows, cols, vals = [], [], []
        for r0 in range(0, n, step):
            r1 = min(r0 + step, n)
            co = torch.as_tensor((Wt[r0:r1] @ W).toarray(), device=dev)
            sim = co / (norm[r0:r1, None] * norm[None, :] + cfg.shrinkage).clamp_(min=1e-12)
            sim[torch.arange(r1 - r0, device=dev), torch.arange(r0, r1, device=dev)] = 0.0
            best = torch.topk(sim, k, dim=1)
            keep = best.values > 0
            rows.append((torch.nonzero(keep)[:, 0] + r0).cpu().numpy())
            cols.append(best.indices[keep].cpu().numpy())
            vals.append(best.values[keep].cpu().numpy())
        S = sp.csr_matrix(
            (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n), dtype=np.float32
        )
        self._set(X, S)
        return self
