"""BPR's CPU training loop: one compiled pass over an epoch's pairs, updating per pair.

Why compiled code instead of tensor ops: on the CPU a BPR epoch is bound by memory
latency (a random user row, the candidates' item rows, the positives search), not by
arithmetic. Tensor ops cut the epoch into many full passes over batch-sized buffers and
compute every candidate check for every pair; one fused loop over pairs touches each row
once and prefetches the rows of the pair `lookahead` places ahead (benchmarks/training.py
times it on a large tenant). Numba does the compiling (LLVM, cached on disk after the first
call); the GPU path stays in torch (pipeline/models/bpr.py), where mini-batches are what the
hardware wants.

Per pair (u, i) with weight w, the same objective as the torch step:
    x = p_u . (q_i - q_j) + b_i - b_j, maximise w ln sigmoid(x) - reg/2 (|p_u|^2 + |q_i|^2 + |q_j|^2)
with j the highest-scored of `negatives` uniform candidates that is no positive of u (the
user's sorted row is binary-searched, the pick first, the others only if it was one). If
every candidate is a positive, w is 0 and only the regularisation applies, as in the torch
step. Row-wise Adagrad: one accumulator of mean squared gradient per row. This is SGD one
pair at a time in the seeded epoch order, as in Rendle et al. (2009); with batch size 1 the
torch step computes the same updates, which tests/unit/test_models_bpr.py checks.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

RING = 64  # candidate draws kept for the pairs in flight; lookahead must stay below it
LOOKAHEAD = 4  # pairs between a prefetch and its use: far enough for the row to arrive, near enough to stay cached


@intrinsic
def _prefetch(typingctx, array, index):
    """Hint the cache to load array[index] (llvm.prefetch: read, keep in all levels)."""

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, signature.args[0], ary, [args[1]], wraparound=False)
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch.p0"
        )
        builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(array, index), codegen


@numba.njit(inline="always")
def _prefetch_row(table, row):
    for t in range(0, table.shape[1], 16):  # one hint per 64-byte line of float32
        _prefetch(table[row], t)


@numba.njit(inline="always")
def _draw(state, n):
    """xorshift64* (Vigna 2016) step and a multiply-shift into [0, n): 2.5 ns, np.random.randint 15 ns."""
    state ^= state >> np.uint64(12)
    state ^= state << np.uint64(25)
    state ^= state >> np.uint64(27)
    x = (state * np.uint64(0x2545F4914F6CDD1D)) >> np.uint64(32)
    return state, np.int64((x * np.uint64(n)) >> np.uint64(32))


@numba.njit(cache=True, nogil=True, boundscheck=False)
def shuffled(n, seed, dtype):
    """A seeded random permutation of range(n) as `dtype` (Fisher-Yates with _draw's
    generator; bias per swap <= n / 2**32): faster than numpy's permutation plus a cast."""
    out = np.empty(n, dtype)  # filled in place: no int64 arange beside it (68 MB at 8.5M pairs)
    for k in range(n):
        out[k] = k
    state = np.uint64(seed) | np.uint64(1)
    for k in range(n - 1, 0, -1):
        state, j = _draw(state, k + 1)
        out[k], out[j] = out[j], out[k]
    return out


@numba.njit(inline="always")
def _ALIGNED(f):
    """f float32s rounded up to whole 64-byte lines, so every scratch row starts on one."""
    return (f + 15) // 16 * 16


@numba.njit(inline="always")
def _is_positive(indptr, items, u, c):
    """Whether c is in u's sorted row items[indptr[u]:indptr[u + 1]]."""
    lo, end = indptr[u], indptr[u + 1]
    hi = end
    while lo < hi:
        mid = (lo + hi) >> 1
        if items[mid] < c:
            lo = mid + 1
        else:
            hi = mid
    return lo < end and items[lo] == c


@numba.njit(inline="always", fastmath=True)
def _dot(a, b):
    s = np.float32(0.0)
    for t in range(a.shape[0]):
        s += a[t] * b[t]
    return s


@numba.njit(cache=True, fastmath=True, nogil=True, boundscheck=False)
def sgd_epoch(params, pairs, order, rule, seed, lookahead, cands):
    """One epoch in place, one thread; returns (sum of w * softplus(-x), pairs whose candidates were all positives).

    params: (P, Q, b, acc_p, acc_q), updated in place. pairs: (users, items, weight, indptr),
    the training pairs sorted by (user, item), so items doubles as the users' sorted rows.
    order: the epoch's permutation of the pairs. rule: (negatives, lr, reg, bias, adagrad).
    Candidates come from a xorshift64* generator seeded with `seed`, drawn in pair order
    whatever the lookahead; `cands` ([len(order), negatives]), when not empty, replaces them (tests).
    """
    return _pass(params, pairs, order, rule, seed, lookahead, cands)


@numba.njit(cache=True, fastmath=True, nogil=True, boundscheck=False, parallel=True)
def sgd_epoch_hogwild(params, pairs, order, rule, seeds, lookahead):
    """sgd_epoch on len(seeds) threads, each over its slice of `order`, updating the shared
    rows without locks (Hogwild, Niu et al. 2011, as implicit does): races lose an update now
    and then, and the result depends on thread timing, so only one thread is reproducible."""
    threads, n = seeds.shape[0], order.shape[0]
    totals, skips = np.zeros(threads), np.zeros(threads, np.int64)
    no_cands = np.zeros((0, rule[0]), np.int64)
    for t in numba.prange(threads):
        lo, hi = t * n // threads, (t + 1) * n // threads
        totals[t], skips[t] = _pass(params, pairs, order[lo:hi], rule, seeds[t], lookahead, no_cands)
    return totals.sum(), skips.sum()


@numba.njit(fastmath=True, nogil=True, boundscheck=False)
def _pass(params, pairs, order, rule, seed, lookahead, cands):
    P, Q, b, acc_p, acc_q = params
    users, items, weight, indptr = pairs
    negatives, lr, reg, bias, adagrad = rule
    if not 0 <= lookahead < RING:
        raise ValueError("lookahead must be in [0, RING)")
    n, f, n_items = order.shape[0], P.shape[1], Q.shape[0]
    given = cands.shape[0] > 0
    state = np.uint64(seed) | np.uint64(1)  # xorshift needs a nonzero state
    ring = np.empty((RING, negatives), np.int64)
    scores = np.empty(negatives, np.float32)
    scratch = np.empty(3 * _ALIGNED(f) + 16, np.float32)
    base = (-(scratch.ctypes.data // 4)) % 16  # first float32 at a 64-byte boundary
    stride = _ALIGNED(f)
    ga = scratch[base : base + f]
    gi = scratch[base + stride : base + stride + f]
    gj = scratch[base + 2 * stride : base + 2 * stride + f]
    lr, reg, inv_f = np.float32(lr), np.float32(reg), np.float32(1.0 / f)
    total, skipped = 0.0, 0
    for q in range(min(lookahead, n)):
        for m in range(negatives):
            state, c = _draw(state, n_items)
            ring[q % RING, m] = cands[q, m] if given else c
    for p in range(n):
        q = p + lookahead
        if q < n:  # draw the candidates of pair q and start loading what it will touch
            for m in range(negatives):
                state, c = _draw(state, n_items)
                if given:
                    c = cands[q, m]
                ring[q % RING, m] = c
                _prefetch_row(Q, c)
            o = order[q]
            u2 = users[o]
            _prefetch_row(P, u2)
            _prefetch_row(Q, items[o])
            _prefetch(acc_p, u2)
            _prefetch(indptr, u2)
        if p + 2 * lookahead < n:  # two stages ahead: the pair itself
            o = order[p + 2 * lookahead]
            _prefetch(users, o)
            _prefetch(items, o)
            _prefetch(weight, o)
        if lookahead > 1 and p + lookahead // 2 < n:  # half a stage ahead: the middle of the row to search
            u2 = users[order[p + lookahead // 2]]
            _prefetch(items, (indptr[u2] + indptr[u2 + 1]) >> 1)
        o = order[p]
        u, i, w = users[o], items[o], weight[o]
        pu, qi = P[u], Q[i]
        slot = p % RING
        best, best_score = 0, -np.inf
        for m in range(negatives):
            c = ring[slot, m]
            s = _dot(Q[c], pu) + (b[c] if bias else np.float32(0.0))
            scores[m] = s
            if s > best_score:
                best, best_score = m, s
        j = ring[slot, best]
        if _is_positive(indptr, items, u, j):  # rare: the next best until one is no positive
            scores[best] = -np.inf
            found = False
            for _ in range(negatives - 1):
                best = 0
                for m in range(1, negatives):
                    if scores[m] > scores[best]:
                        best = m
                if scores[best] == -np.inf:
                    break
                if _is_positive(indptr, items, u, ring[slot, best]):
                    scores[best] = -np.inf
                else:
                    j, found = ring[slot, best], True
                    break
            if not found:
                j, w = ring[slot, 0], np.float32(0.0)
                skipped += 1
        qj = Q[j]
        x = _dot(pu, qi) - _dot(pu, qj) + ((b[i] - b[j]) if bias else np.float32(0.0))
        total += w * (-x if x < -20.0 else math.log1p(math.exp(-x)))
        g = np.float32(w / (1.0 + math.exp(x)))  # d/dx of w ln sigmoid(x)
        for t in range(f):  # ascent directions
            ga[t] = g * (qi[t] - qj[t]) - reg * pu[t]
            gi[t] = g * pu[t] - reg * qi[t]
            gj[t] = -g * pu[t] - reg * qj[t]
        # the squared norms in their own loops over the scratch rows, which sit at fixed offsets
        # of one 64-byte-aligned buffer: a vectorised reduction's order depends on its operands'
        # alignment, and per-call np.empty scratch gave 1-ulp differences between equal fits
        su, si, sj = _dot(ga, ga), _dot(gi, gi), _dot(gj, gj)
        if adagrad:
            acc_p[u] += su * inv_f
            acc_q[i] += si * inv_f
            acc_q[j] += sj * inv_f
            step_u = np.float32(lr / math.sqrt(acc_p[u] + 1e-10))
            step_i = np.float32(lr / math.sqrt(acc_q[i] + 1e-10))
            step_j = np.float32(lr / math.sqrt(acc_q[j] + 1e-10))
        else:
            step_u = step_i = step_j = lr
        for t in range(f):
            pu[t] += step_u * ga[t]
        for t in range(f):
            qi[t] += step_i * gi[t]
        for t in range(f):
            qj[t] += step_j * gj[t]
        if bias:
            b[i] += g * step_i
            b[j] -= g * step_j
    return total, skipped
