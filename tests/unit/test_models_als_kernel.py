"""ALS's compiled CPU conjugate gradient (pipeline/models/als_kernel.py) against the tensor-op
path it replaces on the CPU, and the memory-lean training_pairs against a plain reference."""

import numpy as np
import pytest
import torch

from pipeline.config.models import ALSConfig
from pipeline.models import TrainData
from pipeline.models.als import ALS
from pipeline.models.als_kernel import solve_rows, work_cuts
from pipeline.models.pairs import training_pairs


def _problem(seed=0, users=40, items=25, f=6):
    rng = np.random.default_rng(seed)
    n = 300
    data = TrainData(
        users, items, rng.integers(0, users, n), rng.integers(0, items, n), rng.integers(0, 50, n), np.ones(n)
    )
    pairs = training_pairs(data)
    conf = 1.0 + np.log2(1.0 + pairs.events)
    target = 0.2 + 0.8 * 0.5 ** (pairs.newer / 3.0)
    model = ALS(ALSConfig(factors=f))
    side = model._side(pairs.user, pairs.item, conf, target, users, items, 0.1)
    Y = torch.as_tensor(rng.standard_normal((items, f)) * 0.3, dtype=torch.float32)
    X0 = torch.as_tensor(rng.standard_normal((users, f)) * 0.3, dtype=torch.float32)
    return model, side, Y, X0


def _tensor_path(model, side, Y, X0, steps):
    """The torch block path (the GPU's), run on the CPU: what the kernel must reproduce."""
    FtF, out = Y.T @ Y, torch.empty_like(X0)
    terms = torch.zeros((), dtype=torch.float64)
    for block in side.blocks:
        model._cg_block(side, block, Y, FtF, X0, side.target, side.reg, steps, out[block.r0 : block.r1], terms)
    return out, float(terms)


@pytest.mark.parametrize("steps", [0, 1, 3])
def test_kernel_matches_the_tensor_path_and_its_loss_terms(steps):
    model, side, Y, X0 = _problem()
    want, want_terms = _tensor_path(model, side, Y, X0, steps)
    terms = torch.zeros((), dtype=torch.float64)
    got = model._solve_cg(side, Y, X0, side.target, side.reg, steps, terms)
    assert np.allclose(got.numpy(), want.numpy(), atol=1e-5)
    assert float(terms) == pytest.approx(want_terms, rel=1e-5)


def test_kernel_result_is_the_same_on_any_thread_count_chunking_and_in_place():
    model, side, Y, X0 = _problem(seed=1)
    csr = (side.crow.numpy(), side.col.numpy(), side.weight.numpy(), side.target.numpy())
    G, reg = (Y.T @ Y).numpy(), side.reg.numpy()
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out = np.empty_like(X0.numpy())
            results.append((out, solve_rows(csr, Y.numpy(), G, reg, X0.numpy(), out, 3)))
    finally:
        torch.set_num_threads(before)
    same = X0.numpy().copy()
    terms_in_place = solve_rows(csr, Y.numpy(), G, reg, same, same, 3)  # out is X0: row by row, safe
    for out, terms in results[1:] + [(same, terms_in_place)]:
        assert np.array_equal(out, results[0][0]) and terms == results[0][1]


def test_work_cuts_split_rows_by_nonzeros_plus_the_dense_product():
    # rows with 0, 10, 0, 0, 10 nonzeros and f = 4 (each row also costs f / 2 = 2): costs 2, 12,
    # 2, 2, 12 (total 30); the cut goes where the running cost reaches half: after row 2 (16)
    indptr = np.array([0, 0, 10, 10, 10, 20])
    assert work_cuts(indptr, 4, 2).tolist() == [0, 3, 5]
    assert work_cuts(indptr, 4, 1).tolist() == [0, 5]
    assert work_cuts(np.array([0]), 4, 3).tolist() == [0]  # no rows: no chunks


def test_training_pairs_match_a_plain_reference():
    rng = np.random.default_rng(5)
    n, users, items = 2_000, 50, 30
    u, i = rng.integers(0, users, n), rng.integers(0, items, n)
    t = rng.integers(0, 40, n)  # many ties within a user
    pairs = training_pairs(TrainData(users, items, u, i, t, np.ones(n)))
    keys = sorted(set(zip(u.tolist(), i.tolist(), strict=True)))
    latest = {k: max(t[(u == k[0]) & (i == k[1])]) for k in keys}
    assert list(zip(pairs.user.tolist(), pairs.item.tolist(), strict=True)) == keys
    assert pairs.events.tolist() == [float(((u == a) & (i == b)).sum()) for a, b in keys]
    newer = [sum(latest[o] >= latest[k] for o in keys if o[0] == k[0]) - 1 for k in keys]
    assert pairs.newer.tolist() == newer
    assert pairs.user.dtype == np.int64 and pairs.events.dtype == np.float64 and pairs.newer.dtype == np.float64
    compact = training_pairs(TrainData(users, items, u, i, t, np.ones(n)), index_dtype=np.int32)
    assert compact.user.dtype == np.int32 and compact.item.dtype == np.int32
    assert compact.user.tolist() == pairs.user.tolist() and compact.newer.tolist() == newer
    assert compact.weight.tolist() == [1.0] * len(keys)  # no event weights: a read-only broadcast 1
    assert not compact.weight.flags.writeable


def test_item_side_is_the_transposition_a_stable_sort_gives():
    """Users 0..2 x items 0..3; within an item, rows stay in user order."""
    user = np.array([0, 0, 1, 1, 1, 2])
    item = np.array([1, 3, 0, 1, 3, 1])
    conf, target = np.arange(2.0, 8.0), np.full(6, 0.5)
    for solver in ("cg", "cholesky"):
        model = ALS(ALSConfig(factors=2, solver=solver))
        users = model._side(user, item, conf, target, 3, 4, 0.1)
        got = model._transposed(users, 0.1)
        want = model._side(item, user, conf, target, 4, 3, 0.1)  # the sort-based build
        assert got.crow.tolist() == want.crow.tolist() == [0, 1, 4, 4, 6]
        assert got.col.tolist() == want.col.tolist() == [1, 0, 1, 2, 0, 1]
        assert got.weight.tolist() == want.weight.tolist() == [3.0, 1.0, 4.0, 6.0, 2.0, 5.0]
        assert got.target.tolist() == want.target.tolist()
        assert got.col.dtype == want.col.dtype and got.crow.dtype == want.crow.dtype
        assert got.reg.tolist() == want.reg.tolist() and got.counts.tolist() == want.counts.tolist()
        for (r0, r1, parts), (s0, s1, wparts) in zip(got.tiles, want.tiles, strict=True):
            assert (r0, r1) == (s0, s1) and len(parts) == len(wparts)
            for (c0, c1, m), (d0, d1, w) in zip(parts, wparts, strict=True):
                assert (c0, c1) == (d0, d1) and m.to_dense().tolist() == w.to_dense().tolist()


_FIT = """
import sys
import numpy as np, torch
torch.set_num_threads(int(sys.argv[1]))
from numba.np.ufunc import parallel
from pipeline.config.models import model_config
from pipeline.models import TrainData, build
rng = np.random.default_rng(0)
n = 400
data = TrainData(30, 20, rng.integers(0, 30, n), rng.integers(0, 20, n), rng.integers(0, 99, n), np.full(n, np.nan))
build(model_config({"kind": "als", "factors": 4, "iterations": 1}), torch.device("cpu")).fit(data)
print("POOL", parallel._is_initialized)
"""


@pytest.mark.slow
def test_a_one_thread_fit_never_loads_the_parallel_kernel_from_the_cache(tmp_path):
    """numba's disk cache is keyed by name, not by `parallel`: after a 2-thread fit has cached
    the parallel kernel, a 1-thread fit in a fresh process must still run the serial one (the
    parallel one starts GNU OpenMP's pool, and a process that forks after that is aborted)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path), "PYTHONWARNINGS": "ignore"}

    def fit(threads: int) -> str:
        run = subprocess.run([sys.executable, "-c", _FIT, str(threads)], env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-2000:]
        return run.stdout

    assert "POOL True" in fit(2)
    assert "POOL False" in fit(1)
