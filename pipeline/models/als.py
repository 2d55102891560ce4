"""Implicit-feedback ALS in PyTorch (Hu, Koren & Volinsky 2008), our own vectorised solver.

Objective over all (u, i) of the training events (unobserved cells have target 0, weight 1):
    sum_{obs} c_ui (p_ui - x_u.y_i)^2 + sum_{unobs} (x_u.y_i)^2 + sum_u r_u |x_u|^2 + sum_i r_i |y_i|^2
  confidence  c_ui = 1 + alpha * log2(1 + events of the pair)
  target      p_ui = floor + (1 - floor) * 0.5 ** (k_ui / half_life), k_ui = how many of the
              user's pairs are newer (0 = most recent): recent behaviour predicts the next.
              Counted in events, not seconds, so it is unit-free across tenants.
  reg         r = lambda * max(n, 1) ** reg_exponent (ALS-WR: n = the row's pairs)
After training, users are re-solved once with Y fixed and a sharper recency target (the
"fold-in"); those are the vectors served. On MovieLens-100K (per-user temporal 80/20,
full ranking) this takes NDCG@10 from 0.195 (plain ALS, tuned) to 0.259.

Each half-step solves every row exactly: A_u = YtY + sum_i (c_ui - 1) y_i y_i^T + r_u I,
b_u = sum_i c_ui p_ui y_i. The sum is one sparse x dense product, C @ Z with Z_i = upper
triangle of y_i y_i^T (9x faster than scattering outer products), tiled so memory stays
within `block_floats`; then a batched Cholesky solve. No Python loop over users or items;
the device is chosen once by the caller.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from pipeline.config.models import ALSConfig
from pipeline.models.base import ProgressCallback, TrainData, TrainingDiverged


@dataclass(frozen=True)
class _Side:
    """One side of the confidence matrix (rows = users or items), pre-tiled for the solver.

    tiles[b] = (r0, r1, [(c0, c1, CSR of (c - 1) for rows r0:r1 x cols c0:c1), ...]) bounds the
    memory of A (rows x f^2) and of the outer-product table Z (cols x f^2) alike.
    """

    n_rows: int
    target: torch.Tensor  # CSR (n_rows x n_cols) of c_ui * p_ui, for b = (C P) F
    reg: torch.Tensor  # per-row regularisation
    counts: torch.Tensor  # pairs per row
    tiles: list[tuple[int, int, list[tuple[int, int, torch.Tensor]]]]


@dataclass(frozen=True)
class Pairs:
    """Unique (user, item) training pairs with their confidence and recency rank."""

    user: np.ndarray
    item: np.ndarray
    events: np.ndarray  # events of the pair
    newer: np.ndarray  # k_ui: the user's pairs strictly more recent than this one


def training_pairs(data: TrainData) -> Pairs:
    df = pd.DataFrame({"u": data.user_idx, "i": data.item_idx, "t": data.timestamp})
    agg = df.groupby(["u", "i"], sort=True).agg(t=("t", "max"), n=("t", "size")).reset_index()
    newer = agg.groupby("u")["t"].rank(method="max", ascending=False).to_numpy() - 1.0
    col = lambda name, dtype: np.array(agg[name].to_numpy(dtype), copy=True)  # noqa: E731  (writable for torch)
    return Pairs(col("u", np.int64), col("i", np.int64), col("n", np.float64), np.array(newer, copy=True))


def recency_target(newer: np.ndarray, half_life: float | None, floor: float) -> np.ndarray:
    if not half_life:
        return np.ones_like(newer)
    return floor + (1.0 - floor) * np.power(0.5, newer / half_life)


def _csr(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, shape: tuple[int, int], dev) -> torch.Tensor:
    """CSR from row-sorted COO."""
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
    def _side(self, rows, cols, conf, target, n_rows: int, n_cols: int, reg_lambda: float) -> _Side:
        cfg, dev, f = self.config, self.device, self.config.factors
        step = max(1, self.block_floats // (f * (f + 1) // 2))
        order = np.lexsort((cols, rows))
        rows, cols, conf, target = rows[order], cols[order], conf[order], target[order]
        counts = np.bincount(rows, minlength=n_rows)
        tiles = []
        for r0 in range(0, n_rows, step):
            r1 = min(r0 + step, n_rows)
            lo, hi = np.searchsorted(rows, [r0, r1])
            br, bc, bv = rows[lo:hi] - r0, cols[lo:hi], conf[lo:hi] - 1.0
            parts = []
            for c0 in range(0, n_cols, step):
                c1 = min(c0 + step, n_cols)
                m = (bc >= c0) & (bc < c1)
                if m.any():
                    parts.append((c0, c1, _csr(br[m], bc[m] - c0, bv[m], (r1 - r0, c1 - c0), dev)))
            tiles.append((r0, r1, parts))
        reg = reg_lambda * np.power(np.maximum(counts, 1).astype(np.float64), cfg.reg_exponent)
        return _Side(
            n_rows=n_rows,
            target=_csr(rows, cols, conf * target, (n_rows, n_cols), dev),
            reg=torch.as_tensor(reg, dtype=torch.float32, device=dev),
            counts=torch.as_tensor(counts, device=dev),
            tiles=tiles,
        )

    def _solve(
        self, side: _Side, F: torch.Tensor, target: torch.Tensor | None = None, reg: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Exact least squares for every row of `side`, given the other side's factors F."""
        f = F.shape[1]
        iu, ju = torch.triu_indices(f, f, device=F.device)
        FtF = F.T @ F
        eye = torch.eye(f, device=F.device)
        b_all = (side.target if target is None else target) @ F
        reg = side.reg if reg is None else reg
        out = torch.empty((side.n_rows, f), device=F.device)
        # Z tables (y_i y_i^T, upper triangle) are reused across row tiles while they fit in 8 tiles' memory
        keep_z = F.shape[0] * len(iu) <= 8 * self.block_floats
        z_tables: dict[int, torch.Tensor] = {}
        for r0, r1, parts in side.tiles:
            tri = torch.zeros((r1 - r0, len(iu)), device=F.device)
            for c0, c1, M in parts:  # sum_i (c_ui - 1) y_i y_i^T, upper triangle only
                Z = z_tables.get(c0)
                if Z is None:
                    Fc = F[c0:c1]
                    Z = Fc[:, iu] * Fc[:, ju]
                    if keep_z:
                        z_tables[c0] = Z
                tri += M @ Z
            A = torch.zeros((r1 - r0, f, f), device=F.device)
            A[:, iu, ju] = tri
            A[:, ju, iu] = tri
            A += FtF + reg[r0:r1, None, None] * eye
            L, info = torch.linalg.cholesky_ex(A)
            if bool((info != 0).any()):
                raise TrainingDiverged("ALS normal equations are not positive definite (NaN/inf factors?)")
            out[r0:r1] = torch.cholesky_solve(b_all[r0:r1, :, None], L)[:, :, 0]
        return out

    def loss(self, pairs: tuple[torch.Tensor, ...], user_side: _Side, item_side: _Side) -> float:
        """The full objective per observed pair, without materialising the dense matrix."""
        X, Y = self.X, self.Y
        u, i, c, p = pairs
        s = (X[u] * Y[i]).sum(1)
        all_sq = torch.sum((X.T @ X) * (Y.T @ Y))  # sum over every (u, i) of (x_u.y_i)^2
        obs = torch.sum(c * (p - s) ** 2 - s**2)
        reg = torch.sum(user_side.reg * (X**2).sum(1)) + torch.sum(item_side.reg * (Y**2).sum(1))
        return float((all_sq + obs + reg) / max(len(u), 1))

    def fit(self, data: TrainData, callback: ProgressCallback | None = None) -> ALS:
        cfg, dev = self.config, self.device
        pairs = training_pairs(data)
        conf = 1.0 + cfg.alpha * np.log2(1.0 + pairs.events)
        target = recency_target(pairs.newer, cfg.recency_half_life, cfg.recency_floor)
        user_side = self._side(pairs.user, pairs.item, conf, target, data.n_users, data.n_items, cfg.regularization)
        item_side = self._side(pairs.item, pairs.user, conf, target, data.n_items, data.n_users, cfg.regularization)
        gen = torch.Generator().manual_seed(cfg.seed)
        std = cfg.init_std / np.sqrt(cfg.factors)
        self.X = (torch.randn(data.n_users, cfg.factors, generator=gen) * std).to(dev)
        self.Y = (torch.randn(data.n_items, cfg.factors, generator=gen) * std).to(dev)
        as_t = lambda a: torch.as_tensor(a, dtype=torch.float32, device=dev)  # noqa: E731
        loss_pairs = (
            torch.as_tensor(pairs.user, device=dev),
            torch.as_tensor(pairs.item, device=dev),
            as_t(conf),
            as_t(target),
        )
        for it in range(1, cfg.iterations + 1):
            self.X = self._solve(user_side, self.Y)
            self.Y = self._solve(item_side, self.X)
            loss = self.loss(loss_pairs, user_side, item_side)
            if not np.isfinite(loss):
                raise TrainingDiverged(f"ALS loss is {loss} at iteration {it}")
            if callback is not None:
                callback(it, {"loss": loss})
        if cfg.fold_in_half_life:
            sharp = recency_target(pairs.newer, cfg.fold_in_half_life, cfg.fold_in_floor)
            order = np.lexsort((pairs.item, pairs.user))
            fold_target = _csr(
                pairs.user[order], pairs.item[order], (conf * sharp)[order], (data.n_users, data.n_items), dev
            )
            n = torch.clamp(user_side.counts, min=1).to(torch.float32)
            self.X = self._solve(
                user_side, self.Y, target=fold_target, reg=cfg.fold_in_regularization * n**cfg.reg_exponent
            )
            if not torch.isfinite(self.X).all():
                raise TrainingDiverged("ALS fold-in produced non-finite user vectors")
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
