"""EASE (Steck 2019, "Embarrassingly Shallow Autoencoders"): a closed-form item-item model.

    P = (X^T X + lambda I)^-1,   B = I - P / diag(P)  (column-wise),   diag(B) = 0
    score(u, .) = X[u] @ B

X is the binary user x item training matrix; the Gram matrix is built from W, X with each
pair's event weight at its nonzero (pipeline/models/pairs.py), so a purchase co-occurs more
strongly than a view: G = W^T W (= X^T X when every weight is 1). The inverse is dense: O(n^3) time and O(n^2)
memory in the number of items, so EASE suits catalogs up to some tens of thousands of items
(the evaluate stage's baseline stops at `evaluation.ease_max_items`). Each row of B is then
pruned to its `neighbours` largest |weights| (EASEConfig says why): the sparse S that is
evaluated, persisted and served (pipeline/serving/live.py) is that pruned matrix.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from pipeline.config.models import EASEConfig
from pipeline.models.base import ProgressCallback, TrainData
from pipeline.models.itemitem import ItemItemModel, binary_matrix, weighted_matrix


def top_per_row(B: torch.Tensor, n: int | None) -> sp.csr_matrix:
    """B as CSR with only each row's n largest |entries| (all when n is None or >= the row length)."""
    if n is None or n >= B.shape[1]:
        return sp.csr_matrix(B.cpu().numpy())
    idx = torch.topk(B.abs(), n, dim=1).indices
    rows = np.repeat(np.arange(B.shape[0]), n)
    vals = torch.gather(B, 1, idx)
    return sp.csr_matrix((vals.cpu().numpy().ravel(), (rows, idx.cpu().numpy().ravel())), shape=tuple(B.shape))


class EASE(ItemItemModel):
    kind = "ease"

    def __init__(self, config: EASEConfig | None = None, device: str | torch.device = "cpu") -> None:
        self.config = config or EASEConfig()
        self.device = torch.device(device)

    def fit(self, data: TrainData, callback: ProgressCallback | None = None) -> EASE:
        X, W = binary_matrix(data), weighted_matrix(data)
        gram = torch.as_tensor((W.T @ W).toarray(), dtype=torch.float64, device=self.device)
        gram.diagonal().add_(self.config.regularization)
        P = torch.cholesky_inverse(torch.linalg.cholesky(gram))
        B = P / (-P.diagonal())  # B_ij = -P_ij / P_jj
        B.diagonal().zero_()
        self._set(X, top_per_row(B.float(), self.config.neighbours))
        return self
