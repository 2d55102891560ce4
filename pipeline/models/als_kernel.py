"""ALS's CPU conjugate-gradient half-step: compiled, one row at a time, rows spread over threads.

Why not torch's sparse ops on the CPU: the CG step's two sparse products (the sampled
dense-dense product at the nonzeros and CSR x dense) go through MKL's sparse routines, which
took 75% of a fit's time on an AMD EPYC (torch.profiler, benchmarks/README.md) and made ALS
1.6-2.4x slower than `implicit` there. Per row, CG needs only the row's own nonzeros and the
other side's rows they name: a compiled loop keeps those rows in L1/L2 across all the steps
(the first pass prefetches them), fuses each dot product with its axpy, and needs no
per-block buffers. The same algorithm as the torch path (pipeline/models/als.py, kept for
GPUs): Hu et al. (2008) normal equations, `steps` warm-started CG steps (Takacs et al. 2011).

Rows are independent, so the result does not depend on the thread count or on which thread
ran a row; the loss terms are kept per row and summed in row order. Numba compiles it (LLVM,
cached on disk after the first call), as for BPR (pipeline/models/bpr_kernel.py).
"""

from __future__ import annotations

import types

import numba
import numpy as np

from pipeline.models.bpr_kernel import _ALIGNED, _prefetch_row

AHEAD = 8  # nonzeros between a row's prefetch and its use in the first pass


@numba.njit(inline="always", fastmath=True)
def _dot(a, b):
    s = np.float32(0.0)
    for t in range(a.shape[0]):
        s += a[t] * b[t]
    return s


@numba.njit(inline="always", fastmath=True)
def _dense_part(G, reg, v, out):
    """out = G v + reg v (G symmetric: summed four columns at a time, so out is loaded and
    stored once per four columns instead of once per column)."""
    f = v.shape[0]
    for t in range(f):
        out[t] = reg * v[t]
    j = 0
    while j + 4 <= f:
        g0, g1, g2, g3 = G[j], G[j + 1], G[j + 2], G[j + 3]
        v0, v1, v2, v3 = v[j], v[j + 1], v[j + 2], v[j + 3]
        for t in range(f):
            out[t] += g0[t] * v0 + g1[t] * v1 + g2[t] * v2 + g3[t] * v3
        j += 4
    while j < f:
        g0, v0 = G[j], v[j]
        for t in range(f):
            out[t] += g0[t] * v0
        j += 1


@numba.njit(inline="always", fastmath=True)
def _dot4(a0, a1, a2, a3, b):
    """Four dot products with b in one pass: four independent chains instead of one."""
    s0 = s1 = s2 = s3 = np.float32(0.0)
    for t in range(b.shape[0]):
        bt = b[t]
        s0 += a0[t] * bt
        s1 += a1[t] * bt
        s2 += a2[t] * bt
        s3 += a3[t] * bt
    return s0, s1, s2, s3


@numba.njit(inline="always", fastmath=True)
def _sparse_part(F, indices, weight, lo, hi, v, out):
    """out += sum_k weight_k (F_k . v) F_k over the nonzeros lo:hi, four at a time: the four
    dot products overlap, and out is loaded and stored once per four rows."""
    f = v.shape[0]
    k = lo
    while k + 4 <= hi:
        if k + AHEAD + 4 <= hi:
            for m in range(k + AHEAD, k + AHEAD + 4):
                _prefetch_row(F, indices[m])
        y0, y1, y2, y3 = F[indices[k]], F[indices[k + 1]], F[indices[k + 2]], F[indices[k + 3]]
        s0, s1, s2, s3 = _dot4(y0, y1, y2, y3, v)
        c0, c1, c2, c3 = weight[k] * s0, weight[k + 1] * s1, weight[k + 2] * s2, weight[k + 3] * s3
        for t in range(f):
            out[t] += c0 * y0[t] + c1 * y1[t] + c2 * y2[t] + c3 * y3[t]
        k += 4
    while k < hi:
        y0 = F[indices[k]]
        c0 = weight[k] * _dot(y0, v)
        for t in range(f):
            out[t] += c0 * y0[t]
        k += 1


@numba.njit(cache=True, fastmath=True, nogil=True, boundscheck=False, parallel=True)
def cg_rows(csr, F, G, reg, X0, out, steps, cuts, terms):
    """`steps` CG steps on every row's normal equations, warm-started from X0, into out.

    csr: (indptr, indices, weight = c - 1, target = c p) of this side, rows sorted by column.
    F: the other side's factors; G = F^T F (float32, f x f); reg: per-row regularisation.
    A_u v = G v + reg_u v + sum_k weight_k (F_k . v) F_k; b_u = sum_k target_k F_k.
    out may be X0 itself (row u reads only X0[u] before writing out[u]).
    cuts: row boundaries of the work chunks (any split gives the same result).
    terms: float64 per row, sum_k weight_k s_k^2 - 2 target_k s_k + reg_u |x0_u|^2 with
    s_k = F_k . x0_u (the objective's pair terms at the start point, for the loss).
    """
    indptr, indices, weight, target = csr
    f = F.shape[1]
    stride = _ALIGNED(f)
    for c in numba.prange(cuts.shape[0] - 1):
        # one 64-byte-aligned buffer for x, r, p, Ap: a vectorised reduction's order must not
        # follow the allocator's alignment (bit-identical fits, see bpr_kernel._pass)
        scratch = np.empty(4 * stride + 16, np.float32)
        base = (-(scratch.ctypes.data // 4)) % 16
        x = scratch[base : base + f]
        r = scratch[base + stride : base + stride + f]
        p = scratch[base + 2 * stride : base + 2 * stride + f]
        ap = scratch[base + 3 * stride : base + 3 * stride + f]
        for u in range(cuts[c], cuts[c + 1]):
            lo, hi = indptr[u], indptr[u + 1]
            ru = reg[u]
            for t in range(f):
                x[t] = X0[u, t]
            _dense_part(G, ru, x, r)
            for t in range(f):
                r[t] = -r[t]
            acc = 0.0
            for k in range(lo, min(lo + AHEAD, hi)):
                _prefetch_row(F, indices[k])
            for k in range(lo, hi):  # r = b - A x0, and the loss terms at x0
                if k + AHEAD < hi:
                    _prefetch_row(F, indices[k + AHEAD])
                y = F[indices[k]]
                s = _dot(y, x)
                acc += weight[k] * np.float64(s) * s - 2.0 * target[k] * np.float64(s)
                coef = target[k] - weight[k] * s
                for t in range(f):
                    r[t] += coef * y[t]
            terms[u] = acc + ru * np.float64(_dot(x, x))
            for t in range(f):
                p[t] = r[t]
            rs = _dot(r, r)
            for _ in range(steps):
                if rs <= 0.0:  # solved exactly: every further step would add zero
                    break
                _dense_part(G, ru, p, ap)
                _sparse_part(F, indices, weight, lo, hi, p, ap)
                pap = _dot(p, ap)
                alpha = rs / pap if pap > 0.0 else np.float32(0.0)
                for t in range(f):
                    x[t] += alpha * p[t]
                    r[t] -= alpha * ap[t]
                rs_new = _dot(r, r)
                beta = rs_new / rs
                for t in range(f):
                    p[t] = r[t] + beta * p[t]
                rs = rs_new
            for t in range(f):
                out[u, t] = x[t]


# One thread: the same loop compiled without `parallel`, so a single-threaded fit never starts
# numba's thread pool. Its default layer (GNU OpenMP) aborts a process that forks after using
# it, and a warm parent that fits once and then forks runs (a LocalExecutor, our crash tests)
# pins one thread for exactly that reason.
# It needs its own name: numba's on-disk cache is keyed by the function's qualified name and
# line, not by `parallel`, so compiled from cg_rows.py_func itself the two shared one cache
# entry and whichever process compiled first decided for both (a serial fit then loaded the
# parallel code and started the pool).
def _renamed(fn, name: str):
    code = fn.__code__.replace(co_name=name, co_qualname=name)
    out = types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    out.__qualname__ = name
    return out


cg_rows_serial = numba.njit(cache=True, fastmath=True, nogil=True, boundscheck=False)(
    _renamed(cg_rows.py_func, "cg_rows_serial")
)


def solve_rows(csr, F, G, reg, X0, out, steps: int) -> float:
    """cg_rows on torch's thread count, in chunks of equal work (8 per thread); returns the
    loss terms summed over the rows (in row order: the same sum on any thread count)."""
    import torch

    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))  # type: ignore[attr-defined]
    per_row = np.empty(len(X0), np.float64)
    if threads == 1:
        cg_rows_serial(csr, F, G, reg, X0, out, steps, work_cuts(csr[0], F.shape[1], 8), per_row)
    else:
        numba.set_num_threads(threads)
        cg_rows(csr, F, G, reg, X0, out, steps, work_cuts(csr[0], F.shape[1], 8 * threads), per_row)
    return float(per_row.sum())


def work_cuts(indptr: np.ndarray, f: int, chunks: int) -> np.ndarray:
    """Row boundaries of `chunks` pieces of about equal work (a row costs its nonzeros plus
    f / 2 for the dense f x f product, counted in units of one nonzero's 2f multiply-adds)."""
    n = len(indptr) - 1
    cost = indptr.astype(np.float64) + np.arange(n + 1) * (f / 2.0)
    marks = np.searchsorted(cost, np.linspace(0.0, cost[-1], chunks + 1))
    return np.unique(np.r_[0, marks, n]).astype(np.int64)


@numba.njit(cache=True, nogil=True, boundscheck=False)
def transpose_rows(indptr, cols, weight, target, t_indptr, t_cols, t_weight, t_target):
    """The other side of a CSR (rows -> columns) into preallocated arrays, one counting pass
    (`transpose`). t_indptr must hold the column offsets (cumulative counts); it is left unchanged."""
    n = indptr.shape[0] - 1
    fill = t_indptr[:-1].copy()
    for u in range(n):
        for k in range(indptr[u], indptr[u + 1]):
            c = cols[k]
            at = fill[c]
            t_cols[at] = u
            t_weight[at] = weight[k]
            t_target[at] = target[k]
            fill[c] = at + 1


def transpose(indptr, cols, weight, target, n_cols: int, index_dtype) -> tuple:
    """(counts per column, rows, weight, target) of the CSR's transpose, rows ascending within
    a column: the arrays a stable sort by column gives, without its permutation and sorted
    copies (ALS's item side at 8.5M pairs: ~270 MB less peak RSS)."""
    counts = np.bincount(cols, minlength=n_cols)
    nnz = len(cols)
    rows, t_weight, t_target = np.empty(nnz, index_dtype), np.empty(nnz, np.float32), np.empty(nnz, np.float32)
    transpose_rows(indptr, cols, weight, target, np.concatenate(([0], np.cumsum(counts))), rows, t_weight, t_target)
    return counts, rows, t_weight, t_target
