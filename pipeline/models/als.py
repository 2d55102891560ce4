"""Implicit-feedback ALS in PyTorch (Hu, Koren & Volinsky 2008), our own vectorised solver.

Objective over all (u, i), with p_ui = 1 for observed pairs and 0 otherwise:
    sum_{obs} c_ui (1 - x_u.y_i)^2 + sum_{unobs} (x_u.y_i)^2 + sum_u r_u |x_u|^2 + sum_i r_i |y_i|^2
Confidence c_ui = 1 + alpha * w_ui, where w_ui sums the pair's events, each weighted by a
recency decay relative to the user's latest event (recent behaviour predicts the next).
Regularisation r = lambda * (n + 1) ** reg_exponent (frequency-scaled when reg_exponent > 0).

Each half-step solves every row exactly: A_u = YtY + sum_i (c_ui - 1) y_i y_i^T + r_u I,
b_u = sum_i c_ui y_i. The sum is one sparse x dense product, C @ Z with Z_i = upper triangle of
y_i y_i^T (9x faster than scattering outer products), tiled so memory stays within
`block_floats`; then a batched Cholesky solve. No Python loop over users or items; the
device is chosen once by the caller.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.config.tenant import ALSConfig
from pipeline.models.base import ProgressCallback, TrainData, TrainingDiverged

SECONDS_PER_DAY = 86_400.0


@dataclass(frozen=True)
class _Side:
    """One side of the confidence matrix (rows = users or items), pre-tiled for the solver.

    tiles[b] = (r0, r1, [(c0, c1, CSR of (c - 1) for rows r0:r1 x cols c0:c1), ...]) bounds the
    memory of A (rows x f^2) and of the outer-product table Z (cols x f^2) alike.
    """

    n_rows: int
    conf: torch.Tensor  # CSR (n_rows x n_cols) of c_ui, for b = C F
    reg: torch.Tensor  # per-row regularisation
    tiles: list[tuple[int, int, list[tuple[int, int, torch.Tensor]]]]


def pair_weights(data: TrainData, half_life_days: float | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unique (user, item) pairs and their summed, recency-decayed event weights."""
    w = np.ones(len(data.user_idx), dtype=np.float64)
    if half_life_days:
        last = np.full(data.n_users, np.iinfo(np.int64).min, dtype=np.int64)
        np.maximum.at(last, data.user_idx, data.timestamp)
        age_days = (last[data.user_idx] - data.timestamp) / SECONDS_PER_DAY
        w = np.power(0.5, age_days / half_life_days)
    key = data.user_idx.astype(np.int64) * data.n_items + data.item_idx
    uniq, inverse = np.unique(key, return_inverse=True)
    summed = np.bincount(inverse, weights=w, minlength=len(uniq))
    return uniq // data.n_items, uniq % data.n_items, summed


class ALS:
    kind = "als"

    def __init__(
        self, config: ALSConfig | None = None, device: str | torch.device = "cpu", block_floats: int = 1 << 25
    ) -> None:
        self.config = config or ALSConfig()
        self.device = torch.device(device)
        self.block_floats = block_floats
        self.X: torch.Tensor | None = None
        self.Y: torch.Tensor | None = None

    # --- fitting -----------------------------------------------------------------------
    def _sides(self, data: TrainData) -> tuple[_Side, _Side, tuple[torch.Tensor, ...]]:
        cfg = self.config
        u, i, w = pair_weights(data, cfg.recency_half_life_days)
        conf = 1.0 + cfg.alpha * w
        dev, f = self.device, cfg.factors
        tri = f * (f + 1) // 2
        step = max(1, self.block_floats // tri)

        def csr(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, shape: tuple[int, int]) -> torch.Tensor:
            counts = np.bincount(rows, minlength=shape[0])
            with warnings.catch_warnings():  # "sparse CSR is beta": we rely only on CSR @ dense
                warnings.simplefilter("ignore", UserWarning)
                return torch.sparse_csr_tensor(
                    torch.as_tensor(np.concatenate(([0], np.cumsum(counts)))),
                    torch.as_tensor(cols),
                    torch.as_tensor(vals, dtype=torch.float32),
                    size=shape,
                    check_invariants=False,
                ).to(dev)

        def side(rows: np.ndarray, cols: np.ndarray, n_rows: int, n_cols: int) -> _Side:
            order = np.lexsort((cols, rows))
            rows, cols, c = rows[order], cols[order], conf[order]
            counts = np.bincount(rows, minlength=n_rows)
            tiles = []
            for r0 in range(0, n_rows, step):
                r1 = min(r0 + step, n_rows)
                lo, hi = np.searchsorted(rows, [r0, r1])
                br, bc, bv = rows[lo:hi] - r0, cols[lo:hi], c[lo:hi] - 1.0
                parts = []
                for c0 in range(0, n_cols, step):
                    c1 = min(c0 + step, n_cols)
                    m = (bc >= c0) & (bc < c1)
                    if m.any():
                        parts.append((c0, c1, csr(br[m], bc[m] - c0, bv[m], (r1 - r0, c1 - c0))))
                tiles.append((r0, r1, parts))
            reg = cfg.regularization * np.power(counts + 1.0, cfg.reg_exponent)
            return _Side(
                n_rows=n_rows,
                conf=csr(rows, cols, c, (n_rows, n_cols)),
                reg=torch.as_tensor(reg, dtype=torch.float32, device=dev),
                tiles=tiles,
            )

        pairs = (
            torch.as_tensor(u, device=dev),
            torch.as_tensor(i, device=dev),
            torch.as_tensor(conf, dtype=torch.float32, device=dev),
        )
        return side(u, i, data.n_users, data.n_items), side(i, u, data.n_items, data.n_users), pairs

    def _solve(self, side: _Side, F: torch.Tensor) -> torch.Tensor:
        """Exact least squares for every row of `side`, given the other side's factors F."""
        f = F.shape[1]
        iu, ju = torch.triu_indices(f, f, device=F.device)
        FtF = F.T @ F
        eye = torch.eye(f, device=F.device)
        b_all = side.conf @ F
        out = torch.empty((side.n_rows, f), device=F.device)
        for r0, r1, parts in side.tiles:
            tri = torch.zeros((r1 - r0, len(iu)), device=F.device)
            for c0, c1, M in parts:  # sum_i (c_ui - 1) y_i y_i^T, upper triangle only
                Fc = F[c0:c1]
                tri += M @ (Fc[:, iu] * Fc[:, ju])
            A = torch.zeros((r1 - r0, f, f), device=F.device)
            A[:, iu, ju] = tri
            A[:, ju, iu] = tri
            A += FtF + side.reg[r0:r1, None, None] * eye
            L, info = torch.linalg.cholesky_ex(A)
            if bool((info != 0).any()):
                raise TrainingDiverged("ALS normal equations are not positive definite (NaN/inf factors?)")
            out[r0:r1] = torch.cholesky_solve(b_all[r0:r1, :, None], L)[:, :, 0]
        return out

    def loss(self, pairs: tuple[torch.Tensor, ...], user_side: _Side, item_side: _Side) -> float:
        """The full objective per observed pair, without materialising the dense matrix."""
        X, Y = self.X, self.Y
        u, i, c = pairs
        s = (X[u] * Y[i]).sum(1)
        all_sq = torch.sum((X.T @ X) * (Y.T @ Y))  # sum over every (u, i) of (x_u.y_i)^2
        obs = torch.sum(c * (1.0 - s) ** 2 - s**2)
        reg = torch.sum(user_side.reg * (X**2).sum(1)) + torch.sum(item_side.reg * (Y**2).sum(1))
        return float((all_sq + obs + reg) / max(len(u), 1))

    def fit(self, data: TrainData, callback: ProgressCallback | None = None) -> ALS:
        cfg = self.config
        gen = torch.Generator().manual_seed(cfg.seed)
        std = cfg.init_std / np.sqrt(cfg.factors)
        self.X = (torch.randn(data.n_users, cfg.factors, generator=gen) * std).to(self.device)
        self.Y = (torch.randn(data.n_items, cfg.factors, generator=gen) * std).to(self.device)
        user_side, item_side, pairs = self._sides(data)
        for it in range(1, cfg.iterations + 1):
            self.X = self._solve(user_side, self.Y)
            self.Y = self._solve(item_side, self.X)
            loss = self.loss(pairs, user_side, item_side)
            if not np.isfinite(loss):
                raise TrainingDiverged(f"ALS loss is {loss} at iteration {it}")
            if callback is not None:
                callback(it, {"loss": loss})
        return self

    # --- vectors and persistence -----------------------------------------------------------
    def user_vectors(self) -> np.ndarray:
        assert self.X is not None, "fit first"
        return self.X.detach().float().cpu().numpy()

    def item_vectors(self) -> np.ndarray:
        assert self.Y is not None, "fit first"
        return self.Y.detach().float().cpu().numpy()

    def state(self) -> dict[str, np.ndarray]:
        return {"user_factors": self.user_vectors(), "item_factors": self.item_vectors()}

    def load_state(self, state: dict[str, np.ndarray]) -> ALS:
        self.X = torch.as_tensor(state["user_factors"], device=self.device)
        self.Y = torch.as_tensor(state["item_factors"], device=self.device)
        return self
