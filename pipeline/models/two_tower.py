"""Two-tower retrieval model: a user tower and an item tower meeting in a dot product.

Item tower: item id embedding + category embedding + mean tag embedding + mean hashed
title-token embedding (pipeline/models/_neural.py), summed, optionally a residual MLP,
L2-normalised. An item without training events has no learned id embedding, so its id part
is dropped and its vector comes from its attributes alone; `id_dropout` trains exactly that
case (the attribute path must stand on its own for a random share of items every batch).
Without a catalog the item tower is the id embedding.

User tower: user id embedding + recency-weighted mean of the item-tower vectors of the
user's last `history` items (weight 0.5 ** (k / history_half_life), k = 0 the most recent),
optionally a residual MLP, L2-normalised. A training example is one event; its history is
the user's events strictly before it, so the target never leaks into its own input. The
served user vector uses the user's last `history` training events.

Event weights (pipeline/models/pairs.py): each event's loss term is weighted by its own
weight (normalised over the batch), and each history item's decay weight is multiplied by
its event's weight, so a purchase shapes the user vector more than a view.

Loss: in-batch sampled softmax over the batch's positive items (scores / temperature, minus
logq_weight * log(item frequency), the logQ correction for in-batch sampling; other rows
with the same item are masked), or BPR with one uniform negative per event. Adam, seeded
mini-batches, no Python loop over users or items; memory is O(batch * history * dim) plus
the embedding tables.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config.models import TwoTowerConfig
from pipeline.models._neural import Adam, FittedVectors, ItemAttributes, batches, check_finite, chunked, seeded
from pipeline.models.base import ItemFeatures, ProgressCallback, TrainData


class _Residual(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class Towers(nn.Module):
    """The math: item and user towers. No I/O, no device choice."""

    def __init__(self, n_users: int, n_items: int, cfg: TwoTowerConfig, item_features: ItemFeatures | None) -> None:
        super().__init__()
        d = cfg.dim
        self.user_id = nn.Embedding(n_users, d, sparse=True) if cfg.user_id else None
        self.item_id = nn.Embedding(n_items, d, sparse=True)
        for emb in (self.user_id, self.item_id):
            if emb is not None:
                nn.init.normal_(emb.weight, std=cfg.init_std)
        self.attributes = ItemAttributes(item_features, d, cfg.init_std) if item_features is not None else None
        self.item_mlp = _Residual(d, cfg.hidden) if cfg.hidden else nn.Identity()
        self.user_mlp = _Residual(d, cfg.hidden) if cfg.hidden else nn.Identity()

    def items(self, items: torch.Tensor, keep_id: torch.Tensor) -> torch.Tensor:
        """Unit item vectors; keep_id (bool per item) says whether the id embedding is used."""
        h = self.item_id(items) * keep_id[:, None]
        if self.attributes is not None:
            h = h + self.attributes(items)
        return F.normalize(self.item_mlp(h), dim=-1)

    def users(self, users: torch.Tensor, history: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Unit user vectors from ids and history item vectors [B, L, d] weighted by [B, L]."""
        h = (weights[..., None] * history).sum(1)
        if self.user_id is not None:
            h = h + self.user_id(users)
        return F.normalize(self.user_mlp(h), dim=-1)


@dataclass(frozen=True)
class _Events:
    """Training events in (user, time, item) order, on the device."""

    user: torch.Tensor
    item: torch.Tensor
    start: torch.Tensor  # [n_users] position of the user's first event
    end: torch.Tensor  # [n_users] one past the user's last event
    log_freq: torch.Tensor  # [n_items] log of the item's share of events (in-batch sampling probability)
    warm: torch.Tensor  # [n_items] bool: the item has training events
    weight: torch.Tensor | None  # [events] event weights in this order; None: all 1

    @classmethod
    def of(cls, data: TrainData, device: torch.device) -> _Events:
        order = np.lexsort((data.item_idx, data.timestamp, data.user_idx))
        weighted = data.weight is not None and bool(np.any(data.weights != 1.0))
        user, item = data.user_idx[order], data.item_idx[order]
        counts = np.bincount(user, minlength=data.n_users)
        end = np.cumsum(counts)
        freq = np.bincount(item, minlength=data.n_items).astype(np.float64)
        as_t = lambda a, dtype=torch.int64: torch.as_tensor(np.ascontiguousarray(a), dtype=dtype, device=device)  # noqa: E731
        return cls(
            user=as_t(user),
            item=as_t(item),
            start=as_t(end - counts),
            end=as_t(end),
            log_freq=as_t(np.log(np.maximum(freq, 1.0) / max(len(item), 1)), torch.float32),
            warm=as_t(freq > 0, torch.bool),
            weight=as_t(data.weights[order], torch.float32) if weighted else None,
        )


class TwoTower(FittedVectors):
    kind = "two_tower"

    def __init__(self, config: TwoTowerConfig | None = None, device: str | torch.device = "cpu") -> None:
        self.config = config or TwoTowerConfig()
        self.device = torch.device(device)
        self.U: np.ndarray | None = None
        self.V: np.ndarray | None = None

    def _history(self, ev: _Events, pos: torch.Tensor, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Items [B, L] of the events before `pos` (same user) and their normalised recency weights."""
        cfg = self.config
        k = torch.arange(cfg.history, device=pos.device)
        idx = pos[:, None] - 1 - k[None, :]
        valid = idx >= ev.start[users][:, None]
        decay = 0.5 ** (k / cfg.history_half_life) if cfg.history_half_life else torch.ones_like(k, dtype=torch.float32)
        w = decay[None, :] * valid
        if ev.weight is not None:
            w = w * ev.weight[idx.clamp(min=0)]
        w = w / w.sum(1, keepdim=True).clamp(min=1e-12)
        return ev.item[idx.clamp(min=0)], w

    def _loss(self, net: Towers, ev: _Events, pos: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        cfg, dev = self.config, pos.device
        users, items = ev.user[pos], ev.item[pos]
        hist, w = self._history(ev, pos, users)
        b = len(pos)
        negatives = None
        if cfg.loss == "bpr":
            negatives = torch.randint(0, len(ev.warm), (b,), generator=gen).to(dev)
        wanted = torch.cat([items, hist.flatten()] + ([negatives] if negatives is not None else []))
        uniq, inv = torch.unique(wanted, return_inverse=True)
        keep = ev.warm[uniq]
        if net.attributes is not None and cfg.id_dropout > 0:
            keep = keep & (torch.rand(len(uniq), generator=gen) >= cfg.id_dropout).to(dev)
        V = net.items(uniq, keep)
        v_pos = V[inv[:b]]
        u = net.users(users, V[inv[b : b + hist.numel()]].view(b, cfg.history, V.shape[1]), w)
        if negatives is not None:
            v_neg = V[inv[b + hist.numel() :]]
            terms = -F.logsigmoid(((u * v_pos).sum(1) - (u * v_neg).sum(1)) / cfg.temperature)
        else:
            logits = (u @ v_pos.T) / cfg.temperature - cfg.logq_weight * ev.log_freq[items][None, :]
            same = (items[:, None] == items[None, :]) & ~torch.eye(b, dtype=torch.bool, device=dev)
            logits = logits.masked_fill(same, float("-inf"))
            terms = F.cross_entropy(logits, torch.arange(b, device=dev), reduction="none")
        if ev.weight is None:
            return terms.mean()
        w = ev.weight[pos]
        return (terms * w).sum() / w.sum().clamp(min=1e-12)

    def fit(self, data: TrainData, callback: ProgressCallback | None = None) -> TwoTower:
        cfg, dev = self.config, self.device
        features = data.item_features if cfg.use_features else None
        net = seeded(cfg.seed, lambda: Towers(data.n_users, data.n_items, cfg, features)).to(dev)
        ev = _Events.of(data, dev)
        opt = Adam(net, cfg.learning_rate, cfg.weight_decay)
        gen = torch.Generator().manual_seed(cfg.seed)
        n = len(ev.item)
        for epoch in range(1, cfg.epochs + 1):
            net.train()
            total, steps = 0.0, 0
            for idx in batches(n, cfg.batch_size, gen):
                if len(idx) < 2:
                    continue
                loss = self._loss(net, ev, idx.to(dev), gen)
                opt.step(loss)
                total += float(loss.detach())
                steps += 1
            mean = total / max(steps, 1)
            check_finite(mean, self.kind, epoch)
            if callback is not None:
                callback(epoch, {"loss": mean})
        self._infer(net, ev, data.n_users, data.n_items)
        return self

    def _infer(self, net: Towers, ev: _Events, n_users: int, n_items: int) -> None:
        net.eval()
        self.V = chunked(lambda items: net.items(items, ev.warm[items]), n_items, self.device)
        V = torch.as_tensor(self.V, device=self.device)

        def users(u: torch.Tensor) -> torch.Tensor:
            hist, w = self._history(ev, ev.end[u], u)
            return net.users(u, V[hist], w)

        self.U = chunked(users, n_users, self.device, chunk=8192)
        if not (np.isfinite(self.U).all() and np.isfinite(self.V).all()):
            check_finite(float("nan"), self.kind, self.config.epochs)
