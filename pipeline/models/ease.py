"""EASE (Steck 2019, "Embarrassingly Shallow Autoencoders"): a closed-form item-item model.

    P = (X^T X + lambda I)^-1,   B = I - P / diag(P)  (column-wise),   diag(B) = 0
    score(u, .) = X[u] @ B

X is the binary user x item training matrix. B is a dense n_items x n_items matrix, so
EASE is an evaluation baseline for catalogs up to `evaluation.ease_max_items` (the inverse
costs O(n^3) time and O(n^2) memory); it is not a dot-product model and is not published.
It scores a block of users with `score_block`, which `pipeline.evaluation.ranking.topk_scores` ranks.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from pipeline.config.models import EASEConfig
from pipeline.models.base import ProgressCallback, TrainData


def binary_matrix(data: TrainData) -> sp.csr_matrix:
    """The user x item training matrix with 1 for every pair that has events."""
    m = sp.csr_matrix(
        (np.ones(len(data.user_idx), dtype=np.float32), (data.user_idx, data.item_idx)),
        shape=(data.n_users, data.n_items),
    )
    m.sum_duplicates()
    m.data[:] = 1.0
    return m


class EASE:
    kind = "ease"

    def __init__(self, config: EASEConfig | None = None, device: str | torch.device = "cpu") -> None:
        self.config = config or EASEConfig()
        self.device = torch.device(device)
        self.X: sp.csr_matrix | None = None
        self.B: np.ndarray | None = None

    def fit(self, data: TrainData, callback: ProgressCallback | None = None) -> EASE:
        self.X = binary_matrix(data)
        gram = torch.as_tensor((self.X.T @ self.X).toarray(), dtype=torch.float64, device=self.device)
        gram.diagonal().add_(self.config.regularization)
        P = torch.cholesky_inverse(torch.linalg.cholesky(gram))
        B = P / (-P.diagonal())  # B_ij = -P_ij / P_jj
        B.diagonal().zero_()
        self.B = B.float().cpu().numpy()
        return self

    def score_block(self, users: np.ndarray) -> np.ndarray:
        """Dense scores [len(users), n_items] for these user rows."""
        assert self.X is not None and self.B is not None, "fit first"
        return np.asarray(self.X[users] @ self.B, dtype=np.float32)
