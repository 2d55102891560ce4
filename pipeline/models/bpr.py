"""Bayesian Personalised Ranking (Rendle et al. 2009): SGD over sampled triples, CPU and CUDA.

Maximises, over sampled triples (u, i, j) with i a training item of u and j a negative,
    sum w_ui * ln sigmoid(x_uij) - reg/2 * (|p_u|^2 + |q_i|^2 + |q_j|^2),
    x_uij = p_u . (q_i - q_j) + b_i - b_j.
Each epoch visits every unique training pair once, in a seeded random order. For each pair
`negatives` items are drawn uniformly; candidates that are positives of the user are
skipped (binary search in the user's sorted row) and the highest-scored remaining one is
used: with `negatives` > 1 that is dynamic negative sampling (Zhang et al. 2013), harder
negatives and better rankings. A pair whose candidates are all positives gets weight 0.
`adagrad` is row-wise Adagrad (one accumulator of mean squared gradient per row), so
popular items take proportionally smaller steps. w_ui is an optional recency weight as in
ALS (a user's newest pairs count most), times the pair's event weight (pipeline/models/pairs.py).

Two loops, one objective:
* CPU: pair by pair, in compiled code with prefetching (pipeline/models/bpr_kernel.py):
  memory latency, not arithmetic, bounds BPR on a CPU, and a fused loop touches each row
  once (benchmarks/training.py times it). `threads` > 1 splits each epoch over threads that share the rows without locks
  (Hogwild): faster, no longer reproducible, so 1 is the default.
* CUDA: mini-batches of `batch_size` pairs written by hand as tensor ops (no autograd):
  gathers, fused element-wise ops, and `index_add_` into the touched rows; each batch's
  squares reach the Adagrad accumulators before its step. With batch_size 1 it computes
  the CPU loop's updates, which a test checks.
Both are deterministic given the seed on their device (the CPU with one thread); no Python
loop over users or items.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from pipeline.config.models import BPRConfig
from pipeline.models.base import ProgressCallback, TrainData, TrainingDiverged
from pipeline.models.pairs import recency_target, training_pairs

_EPS = 1e-10


def is_positive(indptr: torch.Tensor, items: torch.Tensor, u: torch.Tensor, c: torch.Tensor, rounds: int):
    """Whether item c[k] is in user u[k]'s sorted row of `items` (c may be [b] or [b, n]).

    Lower-bound binary search in the row, `rounds` = ceil(log2(longest row + 1)) fixed
    rounds, every query at once.
    """
    if c.dim() == 2:
        u = u.unsqueeze(1).expand_as(c)
    lo, end = _rows(indptr, u), _rows(indptr, u + 1)
    hi = end.clone()
    last = max(len(items) - 1, 0)
    for _ in range(rounds):
        open_ = lo < hi
        mid = (lo + hi) // 2
        right = open_ & (_rows(items, mid.clamp(max=last)) < c)
        lo = torch.where(right, mid + 1, lo)
        hi = torch.where(open_ & ~right, mid, hi)
    return (lo < end) & (_rows(items, lo.clamp(max=last)) == c)


def pick_negative(
    scores: torch.Tensor | None,
    cand: torch.Tensor,
    u: torch.Tensor,
    indptr: torch.Tensor,
    items: torch.Tensor,
    rounds: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The best-scored candidate that is no positive of its user, and whether there was one.

    Checks only the pick, then every candidate of the few pairs whose pick was a positive:
    the same answer as testing every candidate of every pair, at about a fifth of the searches.
    Pairs whose candidates are all positives get ok = False and j = their first candidate.
    """
    if scores is None:
        j = cand[:, 0]
        return j, ~is_positive(indptr, items, u, j, rounds)
    pick = scores.argmax(1)
    j = cand.gather(1, pick.unsqueeze(1)).squeeze(1)
    return _repick(scores, cand, u, indptr, items, rounds, j, is_positive(indptr, items, u, j, rounds))


def _repick(scores, cand, u, indptr, items, rounds: int, j, positive) -> tuple[torch.Tensor, torch.Tensor]:
    """For the pairs whose pick was a positive: every candidate checked at once, best non-positive."""
    ok = torch.ones_like(j, dtype=torch.bool)
    todo = positive.nonzero().squeeze(1)
    if todo.numel() == 0:
        return j, ok
    sub = cand.index_select(0, todo)
    pos = is_positive(indptr, items, u.index_select(0, todo), sub, rounds)
    best = scores.index_select(0, todo).masked_fill(pos, float("-inf")).argmax(1, keepdim=True)
    none_left = pos.all(1)
    j.index_copy_(0, todo, torch.where(none_left, sub[:, 0], sub.gather(1, best).squeeze(1)))
    ok.index_copy_(0, todo, ~none_left)
    return j, ok


def _rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """table[index] for a 1-d or 2-d index: index_select is several times faster than advanced indexing on CPU."""
    return table.index_select(0, index.reshape(-1)).view(*index.shape, *table.shape[1:])


def bpr_step(
    P: torch.Tensor,
    Q: torch.Tensor,
    b: torch.Tensor,
    acc_p: torch.Tensor,
    acc_q: torch.Tensor,
    u: torch.Tensor,
    i: torch.Tensor,
    cand: torch.Tensor,
    w: torch.Tensor,
    indptr: torch.Tensor,
    items: torch.Tensor,
    lr: float,
    reg: float,
    rounds: int,
    adagrad: bool,
    bias: bool,
) -> torch.Tensor:
    """One update of P, Q, b (and the Adagrad accumulators) in place; returns the batch loss.

    cand: [b, n] negative candidates per pair; w: [b] weights of the pairs.
    """
    pu, qi = _rows(P, u), _rows(Q, i)
    scores = None
    if cand.shape[1] > 1:  # dynamic negative sampling: the best-scored non-positive candidate
        scores = torch.bmm(_rows(Q, cand), pu.unsqueeze(2)).squeeze(2)
        if bias:
            scores = scores + _rows(b, cand)
    j, ok = pick_negative(scores, cand, u, indptr, items, rounds)
    w = w * ok.to(P.dtype)  # every candidate a positive: skip the pair
    qj = _rows(Q, j)
    diff = qi - qj
    x = torch.einsum("ij,ij->i", pu, diff)
    if bias:
        x = x + _rows(b, i) - _rows(b, j)
    loss = torch.dot(torch.nn.functional.softplus(-x), w)
    g = (torch.sigmoid(-x) * w).unsqueeze(1)  # d/dx of w ln sigmoid(x)
    grad_u = (g * diff).sub_(pu, alpha=reg)  # ascent directions
    gp = g * pu
    grad_i = gp.sub(qi, alpha=reg)
    grad_j = gp.neg_().sub_(qj, alpha=reg)
    if adagrad:
        f = P.shape[1]
        acc_p.index_add_(0, u, torch.linalg.vector_norm(grad_u, dim=1).square_(), alpha=1.0 / f)  # mean square
        acc_q.index_add_(0, i, torch.linalg.vector_norm(grad_i, dim=1).square_(), alpha=1.0 / f)
        acc_q.index_add_(0, j, torch.linalg.vector_norm(grad_j, dim=1).square_(), alpha=1.0 / f)
        step_u = (lr / (_rows(acc_p, u) + _EPS).sqrt()).unsqueeze(1)  # after the whole batch's squares
        step_i = (lr / (_rows(acc_q, i) + _EPS).sqrt()).unsqueeze(1)
        step_j = (lr / (_rows(acc_q, j) + _EPS).sqrt()).unsqueeze(1)
        P.index_add_(0, u, grad_u.mul_(step_u))
        Q.index_add_(0, i, grad_i.mul_(step_i))
        Q.index_add_(0, j, grad_j.mul_(step_j))
        if bias:
            b.index_add_(0, i, (g * step_i).squeeze(1))
            b.index_add_(0, j, -(g * step_j).squeeze(1))
    else:
        P.index_add_(0, u, grad_u, alpha=lr)
        Q.index_add_(0, i, grad_i, alpha=lr)
        Q.index_add_(0, j, grad_j, alpha=lr)
        if bias:
            b.index_add_(0, i, g.squeeze(1), alpha=lr)
            b.index_add_(0, j, -g.squeeze(1), alpha=lr)
    return loss


class BPR:
    kind = "bpr"

    def __init__(self, config: BPRConfig | None = None, device: str | torch.device = "cpu") -> None:
        self.config = config or BPRConfig()
        self.device = torch.device(device)
        self.P: torch.Tensor | None = None  # user factors
        self.Q: torch.Tensor | None = None  # item factors
        self.b: torch.Tensor | None = None  # item bias

    # --- fitting -----------------------------------------------------------------------
    def fit(self, data: TrainData, callback: ProgressCallback | None = None) -> BPR:
        cfg, dev = self.config, self.device
        # unique, sorted by (user, item); int32 indices (the CPU loop's own dtype: no copies)
        pairs = training_pairs(data, index_dtype=np.int32)
        counts = np.bincount(pairs.user, minlength=data.n_users)
        indptr = np.concatenate(([0], np.cumsum(counts)))
        w = recency_target(pairs.newer, cfg.recency_half_life, cfg.recency_floor)  # a new array: 1s if no recency
        w *= pairs.weight  # in place; 1s without event weights
        weight = (w / max(w.mean() if len(w) else 1.0, _EPS)).astype(np.float32)
        users, items = pairs.user, pairs.item
        del w, pairs  # the counts and recency ranks are spent: at 8.5M pairs 3 x 68 MB less at the peak
        init = torch.Generator().manual_seed(cfg.seed)
        std = cfg.init_std / math.sqrt(cfg.factors)
        P = torch.randn(data.n_users, cfg.factors, generator=init) * std
        Q = torch.randn(data.n_items, cfg.factors, generator=init) * std
        b = torch.zeros(data.n_items)
        acc_p, acc_q = torch.zeros(data.n_users), torch.zeros(data.n_items)
        params = [t.to(dev) for t in (P, Q, b, acc_p, acc_q)]
        epochs = self._epochs_cpu if dev.type == "cpu" else self._epochs_torch
        with torch.no_grad():
            for epoch, total in enumerate(epochs(users, items, indptr, weight, *params), start=1):
                loss = total / max(len(users), 1)
                if not math.isfinite(loss):
                    raise TrainingDiverged(f"BPR loss is {loss} at epoch {epoch}")
                if callback is not None:
                    callback(epoch, {"loss": loss})
        self.P, self.Q, self.b = params[0], params[1], params[2]
        return self

    def _epochs_cpu(
        self, users: np.ndarray, items: np.ndarray, indptr: np.ndarray, weight: np.ndarray, *params: torch.Tensor
    ):
        """Yields each epoch's summed loss; the compiled per-pair loop of bpr_kernel."""
        import numba

        from pipeline.models.bpr_kernel import LOOKAHEAD, sgd_epoch, sgd_epoch_hogwild, shuffled  # compiled or cached

        cfg, n, n_items = self.config, len(users), params[1].shape[0]
        if max(n, n_items) >= 2**31:
            raise ValueError(f"BPR's CPU loop indexes with int32: {n} pairs and {n_items} items are too many")
        users, items, ptr = (a.astype(np.int32, copy=False) for a in (users, items, indptr))  # half int64's bytes
        arrays = tuple(t.numpy() for t in params)  # the tensors' memory, updated in place
        data = (users, items, weight, ptr)
        rule = (cfg.negatives, cfg.learning_rate, cfg.regularization, cfg.item_bias, cfg.optimizer == "adagrad")
        rng = np.random.default_rng(cfg.seed)
        threads = min(cfg.threads, numba.config.NUMBA_NUM_THREADS)  # type: ignore[attr-defined]  # set at import
        numba.set_num_threads(threads)
        no_cands = np.zeros((0, cfg.negatives), np.int64)
        for _ in range(cfg.epochs):
            order_seed, seed = (int(s) for s in rng.integers(1, 2**62, 2))
            order = shuffled(n, order_seed, np.int32)
            if threads == 1:
                total, _ = sgd_epoch(arrays, data, order, rule, seed, LOOKAHEAD, no_cands)
            else:
                total, _ = sgd_epoch_hogwild(arrays, data, order, rule, rng.integers(1, 2**62, threads), LOOKAHEAD)
            del order  # before the next epoch's is made: one permutation alive at a time
            yield total

    def _epochs_torch(
        self, users_np: np.ndarray, items_np: np.ndarray, indptr: np.ndarray, weight: np.ndarray, *params: torch.Tensor
    ):
        """Yields each epoch's summed loss; mini-batches of tensor ops (the CUDA path)."""
        cfg, dev, n = self.config, self.device, len(users_np)
        users = torch.as_tensor(users_np, device=dev).long()  # int64 indices for index_select / index_add_
        items = torch.as_tensor(items_np, device=dev).long()
        ptr, w = torch.as_tensor(indptr, device=dev), torch.as_tensor(weight, device=dev)
        rounds = math.ceil(math.log2(int(np.diff(indptr).max(initial=0)) + 1))
        gen = torch.Generator(device=dev).manual_seed(cfg.seed)
        B = min(cfg.batch_size, max(n, 1))
        fixed = (cfg.learning_rate, cfg.regularization, rounds, cfg.optimizer == "adagrad", cfg.item_bias)
        P, Q, b, acc_p, acc_q = params
        n_items = Q.shape[0]
        for _ in range(cfg.epochs):
            order = torch.randperm(n, generator=gen, device=dev)
            u_all, i_all, w_all = (a.index_select(0, order) for a in (users, items, w))
            total = torch.zeros((), dtype=torch.float64, device=dev)
            for start in range(0, n, B):
                u, i, wb = u_all[start : start + B], i_all[start : start + B], w_all[start : start + B]
                cand = torch.randint(n_items, (len(u), cfg.negatives), generator=gen, device=dev)
                total += bpr_step(P, Q, b, acc_p, acc_q, u, i, cand, wb, ptr, items, *fixed)
            yield float(total)

    # --- vectors and persistence -----------------------------------------------------------
    def user_vectors(self) -> np.ndarray:
        """[p_u, 1]: the item bias rides in the last item column, so score = p_u . q_i + b_i."""
        assert self.P is not None, "fit first"
        P = self.P.detach().float().cpu().numpy()
        return np.hstack((P, np.ones((len(P), 1), np.float32))) if self.config.item_bias else P

    def item_vectors(self) -> np.ndarray:
        assert self.Q is not None and self.b is not None, "fit first"
        Q = self.Q.detach().float().cpu().numpy()
        return np.hstack((Q, self.b.detach().float().cpu().numpy()[:, None])) if self.config.item_bias else Q

    def state(self) -> dict[str, np.ndarray]:
        assert self.P is not None and self.Q is not None and self.b is not None, "fit first"
        return {
            "user_factors": self.P.detach().float().cpu().numpy(),
            "item_factors": self.Q.detach().float().cpu().numpy(),
            "item_bias": self.b.detach().float().cpu().numpy(),
        }

    def load_state(self, state: dict[str, np.ndarray]) -> BPR:
        self.P = torch.as_tensor(state["user_factors"], device=self.device)
        self.Q = torch.as_tensor(state["item_factors"], device=self.device)
        self.b = torch.as_tensor(state["item_bias"], device=self.device)
        return self
