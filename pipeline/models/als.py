"""Implicit-feedback ALS in PyTorch (Hu, Koren & Volinsky 2008), our own vectorised solver.

Objective over all (u, i) of the training events (unobserved cells have target 0, weight 1):
    sum_{obs} c_ui (p_ui - x_u.y_i)^2 + sum_{unobs} (x_u.y_i)^2 + sum_u r_u |x_u|^2 + sum_i r_i |y_i|^2
  confidence  c_ui = 1 + alpha * w_ui * log2(1 + events of the pair), w_ui the pair's event
              weight (pipeline/models/pairs.py: 1 without event types)
  target      p_ui = floor + (1 - floor) * 0.5 ** (k_ui / half_life), k_ui = how many of the
              user's pairs are newer (0 = most recent): recent behaviour predicts the next.
              Counted in events, not seconds, so it is unit-free across tenants.
  reg         r = lambda * max(n, 1) ** reg_exponent (ALS-WR: n = the row's pairs)
After training, users are re-solved once with Y fixed and a sharper recency target (the
"fold-in", pipeline/models/als_fold.py, which serving shares); those are the vectors served
(ML-100K NDCG@10: 0.194 plain, 0.268 with it). Items without events first get vectors from
their catalog attributes (a ridge map fitted on the warm items, models/attribute_map.py).

Each half-step solves A_u x_u = b_u for every row, A_u = YtY + sum_i (c_ui - 1) y_i y_i^T + r_u I,
b_u = sum_i c_ui p_ui y_i, with one of two batched solvers:
  cg        (default) `cg_steps` conjugate-gradient steps per row, warm-started from the
            previous factors (Takacs et al. 2011; implicit's default). A_u is never formed:
            A_u p_u = YtY p_u + sum_i (c_ui - 1) (y_i.p_u) y_i: O(nnz f) per step instead of
            O(nnz f^2 + rows f^3). On a GPU, tensor ops for a block of rows at once (a sampled
            dense-dense product at the nonzeros, CSR x dense, one GEMM); on the CPU a compiled
            loop row by row on all cores (als_kernel.py: MKL's sparse paths are slow on AMD).
            Iteration k's loss comes from iteration k+1's first product (benchmarks/ compare).
  cholesky  exact: one sparse x dense product C @ Z, Z_i = upper triangle of y_i y_i^T, tiled
            within `block_floats`, then a batched Cholesky solve. No Python loop over rows.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.config.models import ALSConfig
from pipeline.models.als_fold import fold_in_terms, row_regularization
from pipeline.models.als_pairs import als_pairs
from pipeline.models.attribute_map import fill_cold
from pipeline.models.base import ProgressCallback, TrainData, TrainingDiverged


@dataclass(frozen=True)
class _Side:
    """One side of the confidence matrix (rows = users or items) in CSR, row-sorted.

    Both value arrays share one (crow, col) pattern. For the exact solver, tiles[b] =
    (r0, r1, [(c0, c1, CSR of (c - 1) for rows r0:r1 x cols c0:c1), ...]) bounds the memory of
    A (rows x f^2) and of the outer-product table Z (cols x f^2) alike; CG needs no tiles.
    """

    n_rows: int
    n_cols: int
    crow: torch.Tensor
    col: torch.Tensor
    weight: torch.Tensor  # c_ui - 1 at the nonzeros
    target: torch.Tensor  # c_ui * p_ui at the nonzeros, for b = (C P) F
    reg: torch.Tensor  # per-row regularisation
    counts: torch.Tensor  # pairs per row
    tiles: list[tuple[int, int, list[tuple[int, int, torch.Tensor]]]]
    blocks: list[_Block]

    def csr(self, values: torch.Tensor) -> torch.Tensor:
        """This side's pattern with other values (no copy of the index arrays)."""
        return _with_values(self.crow, self.col, values, (self.n_rows, self.n_cols))


@dataclass(frozen=True)
class _Block:
    """Rows r0:r1 of a side, whose nonzeros are lo:hi; crow rebased to 0."""

    r0: int
    r1: int
    lo: int
    hi: int
    crow: torch.Tensor


def _with_values(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():  # "sparse CSR is beta": we rely only on products with dense
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, size=size, check_invariants=False)


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
        self,
        config: ALSConfig | None = None,
        device: str | torch.device = "cpu",
        block_floats: int = 1 << 25,
        block_nnz: int | None = None,
    ) -> None:
        self.config = config or ALSConfig()
        self.device = torch.device(device)
        self.block_floats = block_floats
        # the tensor-op CG's rows per launch (on the CPU only when called directly, as tests do)
        self.block_nnz = block_nnz or (1 << 16 if self.device.type == "cpu" else 1 << 62)
        self.X: torch.Tensor | None = None
        self.Y: torch.Tensor | None = None

    # --- fitting -----------------------------------------------------------------------
    def _side(self, rows, cols, conf, target, n_rows: int, n_cols: int, reg_lambda: float) -> _Side:
        """rows, cols: the pairs in (user, item) order (Pairs' order), for either side."""
        weight, ctarget = (conf - 1.0).astype(np.float32), (conf * target).astype(np.float32)
        return self._side_of(rows, cols, weight, ctarget, n_rows, n_cols, reg_lambda)

    def _side_of(self, rows, cols, weight, ctarget, n_rows: int, n_cols: int, reg_lambda: float) -> _Side:
        """_side from weight = c - 1 and ctarget = c p in float32 (unchanged: it permutes copies)."""
        # int32 indices: faster CSR x dense (MKL's 32-bit interface), half-size permuted copies
        index = torch.int32 if max(len(rows), n_cols) < 2**31 else torch.int64
        cols = np.asarray(cols).astype(np.int32 if index == torch.int32 else np.int64, copy=False)
        counts = np.bincount(rows, minlength=n_rows)
        if len(rows) > 1 and not bool(np.all(rows[1:] >= rows[:-1])):  # the user side comes sorted
            # a stable sort keeps cols ascending within a row (torch's on int32 beats numpy's)
            key = torch.as_tensor(rows, dtype=torch.int32 if n_rows < 2**31 else torch.int64)
            order = torch.sort(key, stable=True).indices.numpy()
            cols, weight, ctarget = cols[order], weight[order], ctarget[order]
            rows = rows[order] if self.config.solver == "cholesky" else None  # only the tiles need rows
            del key, order
        return self._assemble(rows, cols, weight, ctarget, counts, n_rows, n_cols, reg_lambda)

    def _transposed(self, side: _Side, reg_lambda: float) -> _Side:
        """The other side of `side` (items from users): als_kernel.transpose, no sort copies."""
        from pipeline.models.als_kernel import transpose  # numba: compiled or cached on first use

        crow, col, w, t = (x.cpu().numpy() for x in (side.crow, side.col, side.weight, side.target))
        small = max(len(side.col), side.n_rows) < 2**31
        counts, cols, weight, ctarget = transpose(crow, col, w, t, side.n_cols, np.int32 if small else np.int64)
        rows = np.repeat(np.arange(side.n_cols), counts) if self.config.solver == "cholesky" else None
        return self._assemble(rows, cols, weight, ctarget, counts, side.n_cols, side.n_rows, reg_lambda)

    def _assemble(self, rows, cols, weight, ctarget, counts, n_rows: int, n_cols: int, reg_lambda: float) -> _Side:
        cfg, dev, indptr = self.config, self.device, np.concatenate(([0], np.cumsum(counts)))
        crow = torch.as_tensor(indptr, dtype=torch.int32 if cols.dtype == np.int32 else torch.int64, device=dev)
        reg = row_regularization(counts, reg_lambda, cfg.reg_exponent)
        cuts = np.unique(np.r_[0, np.searchsorted(indptr, np.arange(0, len(cols), self.block_nnz)), n_rows])
        blocks = [
            _Block(int(r0), int(r1), int(indptr[r0]), int(indptr[r1]), crow[r0 : r1 + 1] - crow[r0])
            for r0, r1 in zip(cuts[:-1], cuts[1:], strict=True)
        ]
        return _Side(
            n_rows=n_rows,
            n_cols=n_cols,
            crow=crow,
            col=torch.as_tensor(cols, device=dev),
            weight=torch.as_tensor(weight, device=dev),
            target=torch.as_tensor(ctarget, device=dev),
            reg=torch.as_tensor(reg, dtype=torch.float32, device=dev),
            counts=torch.as_tensor(counts, device=dev),
            tiles=self._tiles(rows, cols, weight, n_rows, n_cols) if cfg.solver == "cholesky" else [],
            blocks=blocks,
        )

    def _tiles(self, rows, cols, weight, n_rows: int, n_cols: int) -> list:
        f = self.config.factors
        step = max(1, self.block_floats // (f * (f + 1) // 2))
        tiles = []
        for r0 in range(0, n_rows, step):
            r1 = min(r0 + step, n_rows)
            lo, hi = np.searchsorted(rows, [r0, r1])
            br, bc, bv = rows[lo:hi] - r0, cols[lo:hi].astype(np.int64), weight[lo:hi]
            parts = []
            for c0 in range(0, n_cols, step):
                c1 = min(c0 + step, n_cols)
                m = (bc >= c0) & (bc < c1)
                if m.any():
                    parts.append((c0, c1, _csr(br[m], bc[m] - c0, bv[m], (r1 - r0, c1 - c0), self.device)))
            tiles.append((r0, r1, parts))
        return tiles

    def _solve(
        self,
        side: _Side,
        F: torch.Tensor,
        X0: torch.Tensor,
        target: torch.Tensor | None = None,
        reg: torch.Tensor | None = None,
        steps: int | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """New factors for every row of `side` given the other side's factors F (X0: current ones;
        CG writes into `out`, which may be X0)."""
        target = side.target if target is None else target
        reg = side.reg if reg is None else reg
        if self.config.solver == "cholesky":
            return self._solve_exact(side, F, target, reg)
        return self._solve_cg(side, F, X0, target, reg, steps or self.config.cg_steps, out=out)

    def _solve_cg(
        self,
        side: _Side,
        F: torch.Tensor,
        X0: torch.Tensor,
        target: torch.Tensor,
        reg: torch.Tensor,
        steps: int,
        terms: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`steps` conjugate-gradient steps on every row's normal equations, block by block, from X0.

        terms (float64 scalar): if given, sum over this side's pairs of (c - 1) s^2 - 2 c p s, plus
        sum of r |x0|^2 (s = x0_u . y_i), added in: the objective at (X0, F) minus its cheap parts,
        taken from the product the first CG residual computes anyway. out may be X0 (in place).
        On the CPU the compiled row-by-row loop of als_kernel runs instead of the tensor ops.
        """
        FtF, out = F.T @ F, torch.empty_like(X0) if out is None else out
        if F.device.type == "cpu":
            from pipeline.models.als_kernel import solve_rows  # numba: compiled or cached on first use

            csr = (side.crow.numpy(), side.col.numpy(), side.weight.numpy(), target.numpy())
            pair_terms = solve_rows(csr, F.numpy(), FtF.numpy(), reg.numpy(), X0.numpy(), out.numpy(), steps)
            if terms is not None:
                terms += pair_terms
        else:
            for block in side.blocks:
                self._cg_block(side, block, F, FtF, X0, target, reg, steps, out[block.r0 : block.r1], terms)
        if not bool(torch.isfinite(out.sum())):  # a NaN or inf anywhere poisons the sum; one cheap pass
            raise TrainingDiverged("ALS conjugate gradient produced non-finite factors")
        return out

    @staticmethod
    def _cg_block(side, block, F, FtF, X0, target, reg, steps: int, x: torch.Tensor, terms) -> None:
        """CG for rows r0:r1 into x, all rows at once: A p = (FtF + r I) p + S F, where S holds
        (c_ui - 1)(p_u . y_i) at the nonzeros (one sampled dense-dense product). Arrays are
        updated in place: fresh temporaries cost more in page faults than their arithmetic."""
        lo, hi, n = block.lo, block.hi, block.r1 - block.r0
        col, weight, Ft, reg = side.col[lo:hi], side.weight[lo:hi], F.T, reg[block.r0 : block.r1, None]
        # one CSR per block whose values are rewritten in place (no index copies per product);
        # zeros, not empty: sampled_addmm reads them even with beta=0 (0 * NaN garbage = NaN)
        S = _with_values(block.crow, col, torch.zeros(hi - lo, device=F.device), (n, side.n_cols))
        rowdot = lambda a, b: torch.einsum("ij,ij->i", a, b)  # noqa: E731  (faster than (a*b).sum(1))

        def product(P: torch.Tensor) -> torch.Tensor:  # S = p_u . y_i at the nonzeros
            return torch.sparse.sampled_addmm(S, P, Ft, beta=0.0, out=S).values()

        def dense_part(P: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
            return torch.mm(P, FtF, out=out).addcmul_(reg, P)

        x.copy_(X0[block.r0 : block.r1])
        r = dense_part(x, torch.empty_like(x)).neg_()
        s, t = product(x), target[lo:hi]
        if terms is not None:
            terms += (torch.dot(weight, s * s) - 2.0 * torch.dot(t, s) + torch.dot(reg[:, 0], rowdot(x, x))).double()
        s.mul_(weight).neg_().add_(t)
        torch.addmm(r, S, F, out=r)  # r = b - A x0, b's product folded in
        p, Ap = r.clone(), torch.empty_like(x)
        rs = rowdot(r, r)
        for _ in range(steps):
            product(p).mul_(weight)  # S = (c_ui - 1)(p_u . y_i)
            torch.addmm(dense_part(p, Ap), S, F, out=Ap)
            pAp = rowdot(p, Ap)
            alpha = torch.where(pAp > 0, rs / pAp, torch.zeros_like(rs))[:, None]
            x.addcmul_(alpha, p)
            r.addcmul_(alpha, Ap, value=-1.0)
            rs_new = rowdot(r, r)
            p.mul_(torch.where(rs > 0, rs_new / rs, torch.zeros_like(rs))[:, None]).add_(r)
            rs = rs_new

    def _solve_exact(self, side: _Side, F: torch.Tensor, target: torch.Tensor, reg: torch.Tensor) -> torch.Tensor:
        """Exact least squares for every row: tiled normal equations, batched Cholesky."""
        f = F.shape[1]
        iu, ju = torch.triu_indices(f, f, device=F.device)
        FtF = F.T @ F
        eye = torch.eye(f, device=F.device)
        b_all = side.csr(target) @ F
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

    def loss(
        self,
        user_side: _Side,
        item_side: _Side,
        constant: float,
        terms: torch.Tensor | None = None,
        gram: torch.Tensor | None = None,
    ) -> float:
        """The full objective per observed pair, without materialising the dense matrix.

        Per pair c (p - s)^2 - s^2 (the unobserved cell's s^2 is in the all-cells term) expands
        to c p^2 - 2 c p s + (c - 1) s^2: `constant` is sum c p^2; the pair terms and the user
        regulariser come from `terms` (see _solve_cg), computed here if not given; `gram`: X^T X
        of the X the terms were taken at, if X has been overwritten since.
        """
        X, Y = self.X, self.Y
        assert X is not None and Y is not None, "fit first"
        if terms is None:
            terms = torch.zeros((), dtype=torch.float64, device=X.device)
            self._solve_cg(user_side, Y, X, user_side.target, user_side.reg, 0, terms, out=X)  # 0 steps: X unchanged
        all_sq = torch.sum((X.T @ X if gram is None else gram) * (Y.T @ Y))  # sum over every (u, i) of (x_u.y_i)^2
        item_reg = torch.dot(item_side.reg, torch.einsum("ij,ij->i", Y, Y))
        return float((constant + all_sq.double() + terms + item_reg.double()) / max(len(user_side.col), 1))

    def fit(self, data: TrainData, callback: ProgressCallback | None = None) -> ALS:
        cfg, dev = self.config, self.device
        p = als_pairs(data, cfg)  # lean on memory; the item side is then a transposition (no sort)
        constant, fold = p.constant, fold_in_terms(cfg)
        fold_target = None if p.fold_target is None else torch.as_tensor(p.fold_target, device=dev)
        user_side = self._side_of(p.user, p.item, p.weight, p.ctarget, data.n_users, data.n_items, cfg.regularization)
        del p
        item_side = self._transposed(user_side, cfg.regularization)
        gen = torch.Generator().manual_seed(cfg.seed)
        std = cfg.init_std / np.sqrt(cfg.factors)
        self.X = torch.randn(data.n_users, cfg.factors, generator=gen).mul_(std).to(dev)
        self.Y = torch.randn(data.n_items, cfg.factors, generator=gen).mul_(std).to(dev)
        # on the CPU each half-step overwrites the factors it solves (saves a copy of X)
        out = (lambda M: M) if dev.type == "cpu" else (lambda M: None)  # noqa: E731

        def report(it: int, terms: torch.Tensor | None, gram: torch.Tensor | None = None) -> None:
            loss = self.loss(user_side, item_side, constant, terms, gram)
            if not np.isfinite(loss):
                raise TrainingDiverged(f"ALS loss is {loss} at iteration {it}")
            if callback is not None:
                callback(it, {"loss": loss})

        for it in range(1, cfg.iterations + 1):
            if cfg.solver == "cg" and it > 1:  # iteration it-1's loss from this half-step's first product
                terms = torch.zeros((), dtype=torch.float64, device=dev)
                gram = self.X.T @ self.X
                X = self._solve_cg(
                    user_side, self.Y, self.X, user_side.target, user_side.reg, cfg.cg_steps, terms, out(self.X)
                )
                report(it - 1, terms, gram)
                self.X = X
            else:
                self.X = self._solve(user_side, self.Y, self.X, out=out(self.X))
            self.Y = self._solve(item_side, self.X, self.Y, out=out(self.Y))
            if cfg.solver == "cholesky" or it == cfg.iterations:
                report(it, None)
        fill_cold(self.Y, data.item_features, item_side.counts.cpu().numpy(), cfg.cold_item_regularization)
        if fold_target is not None:
            fold_reg = row_regularization(user_side.counts.cpu().numpy(), fold.regularization, cfg.reg_exponent)
            self.X = self._solve(
                user_side,
                self.Y,
                self.X,
                target=fold_target,
                reg=torch.as_tensor(fold_reg, dtype=torch.float32, device=dev),
                steps=cfg.fold_in_cg_steps,
                out=out(self.X),
            )
            if not bool(torch.isfinite(self.X.sum())):  # as _solve_cg: isfinite(X) would cost 1.7 X (213 MB)
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
