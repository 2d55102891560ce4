"""Vectors for items without interactions from their catalog attributes: a ridge map.

A factor model learns nothing about an item nobody has interacted with: ALS leaves it at 0,
so a catalog item that is new this run is never recommended until the next release after
its first events. At train time we fit, on the warm items,

    W = argmin |F_warm W - Y_warm|^2 + lambda |W|^2,   F = [category one-hot | tags | title tokens]

(the attribute features of pipeline/features: the same columns two-tower embeds) and give
every cold item y_i = F_i W. The vectors land in the model's item factors, so the release's
item_vectors.npy, the index, evaluation and serving all score cold items with no new code;
an item with no attributes at all keeps its zero vector. The solve is block conjugate
gradient on the normal equations with F sparse (never a d x d matrix: title tokens make d
up to 16k), every factor column at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from pipeline.models.base import ItemFeatures

if TYPE_CHECKING:  # loaded where used: ALS imports this module, and a fit without attributes needs no scipy
    import scipy.sparse as sp


def feature_matrix(features: ItemFeatures) -> sp.csr_matrix:
    import scipy.sparse as sp

    """[items, d] float64: category one-hot, tags, title tokens; only columns some item uses."""
    n = len(features.category)
    has = features.category >= 0
    n_cat = int(features.category.max()) + 1 if has.any() else 0
    category = sp.csr_matrix((np.ones(int(has.sum())), (np.flatnonzero(has), features.category[has])), shape=(n, n_cat))
    m = sp.csr_matrix(sp.hstack([category, features.tags, features.tokens], format="csr"), dtype=np.float64)
    used = np.flatnonzero(np.diff(m.tocsc().indptr) > 0)
    return sp.csr_matrix(m[:, used])


def fit_map(F: sp.csr_matrix, Y: np.ndarray, lam: float, steps: int = 100, tol: float = 1e-6) -> np.ndarray:
    """W [d, f] minimising |F W - Y|^2 + lam |W|^2 (conjugate gradient, one column per factor)."""
    import scipy.sparse as sp

    Ft = sp.csr_matrix(F.T)
    b = Ft @ Y
    W = np.zeros_like(b)

    def apply(P: np.ndarray) -> np.ndarray:
        return Ft @ (F @ P) + lam * P

    r = b - apply(W)
    p = r.copy()
    rs = np.einsum("ij,ij->j", r, r)
    stop = tol * max(float(np.einsum("ij,ij->j", b, b).max(initial=0.0)), 1e-30)
    for _ in range(steps):
        if rs.max(initial=0.0) <= stop:
            break
        Ap = apply(p)
        pAp = np.einsum("ij,ij->j", p, Ap)
        alpha = np.divide(rs, pAp, out=np.zeros_like(rs), where=pAp > 0)
        W += alpha * p
        r -= alpha * Ap
        rs_new = np.einsum("ij,ij->j", r, r)
        p = r + np.divide(rs_new, rs, out=np.zeros_like(rs), where=rs > 0) * p
        rs = rs_new
    return W


def cold_vectors(
    features: ItemFeatures, Y: np.ndarray, item_pairs: np.ndarray, lam: float, min_pairs: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """(cold item rows, their vectors [len(rows), f]) for items with no pairs but some attribute.

    The map is fitted on the items with at least `min_pairs` training pairs; empty when there
    are no cold items with attributes or no warm items to learn from.
    """
    F = feature_matrix(features)
    has_attributes = np.diff(F.indptr) > 0
    cold = np.flatnonzero((item_pairs == 0) & has_attributes)
    warm = np.flatnonzero((item_pairs >= min_pairs) & has_attributes)
    if not len(cold) or not len(warm) or F.shape[1] == 0:
        return np.zeros(0, np.int64), np.zeros((0, Y.shape[1]), Y.dtype)
    W = fit_map(F[warm], Y[warm].astype(np.float64), lam)
    return cold, (F[cold] @ W).astype(Y.dtype)


def fill_cold(Y, features: ItemFeatures | None, counts: np.ndarray, lam: float | None) -> None:
    """Overwrite the rows of torch factors `Y` whose items have no events (`counts` 0) with their
    attribute-mapped vectors; nothing without features, with lam 0 or without cold items."""
    if not lam or features is None:
        return
    import torch

    cold, vectors = cold_vectors(features, Y.detach().float().cpu().numpy(), counts, lam)
    if len(cold):
        Y[torch.as_tensor(cold, device=Y.device)] = torch.as_tensor(vectors, dtype=Y.dtype, device=Y.device)
