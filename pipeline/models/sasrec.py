"""SASRec (Kang & McAuley, "Self-Attentive Sequential Recommendation", 2018) in torch.

Each user is the sequence of their distinct items, oldest first (models/sequence.py). The
encoder embeds the last `max_len` of them (item embedding * sqrt(dim) + a position embedding
counted from the newest item, so a short history needs no padding at serving), runs `layers`
pre-LayerNorm blocks of causal self-attention and a position-wise feed-forward layer, and a
final LayerNorm. Its output at position t scores the item at t + 1 by a dot product with the
item embedding (tied to the input), so this is a dot-product kind: item vectors are the item
embeddings, a user's vector is the output at their newest item. Serving recomputes that from
the seen list when events arrive (`SequenceEncoder`, numpy): no solve, no retraining.

Training: every user's sequence is cut, from its end, into windows of `max_len` + 1 items; every
position of a window predicts the next item (each item but a user's first is a target once),
with a softmax over all items or over `negatives` shared uniform draws. Sequences are
left-padded; a padded query attends only to itself, a real one never to padding, so a real
position's output is the same with or without the padding (what makes the numpy twin exact).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config.models import SASRecConfig
from pipeline.models._neural import FittedVectors, batches, check_finite, seeded
from pipeline.models.base import ProgressCallback, TrainData
from pipeline.models.sequence import LN_EPS, PREFIX, chronological


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim, eps=LN_EPS), nn.LayerNorm(dim, eps=LN_EPS)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.ff1, self.ff2 = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # mask True: may attend
        x = x + self.drop(self.proj(att.transpose(1, 2).reshape(b, n, d)))
        return x + self.drop(self.ff2(self.drop(F.relu(self.ff1(self.ln2(x))))))


class SASRecNet(nn.Module):
    """The math: embeddings, blocks, final norm. Item row `n_items` is the padding."""

    def __init__(self, n_items: int, cfg: SASRecConfig) -> None:
        super().__init__()
        self.pad = n_items
        self.items = nn.Embedding(n_items + 1, cfg.dim, padding_idx=n_items)
        self.position = nn.Embedding(cfg.max_len, cfg.dim)
        nn.init.normal_(self.items.weight, std=cfg.init_std)
        nn.init.normal_(self.position.weight, std=cfg.init_std)
        with torch.no_grad():
            self.items.weight[n_items].zero_()
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.heads, cfg.dropout) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.dim, eps=LN_EPS)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """[B, n, d] outputs of left-padded item sequences [B, n] (n <= max_len)."""
        n, d = seq.shape[1], self.items.embedding_dim
        valid = seq != self.pad
        recency = torch.arange(n - 1, -1, -1, device=seq.device)  # 0 = the newest position
        x = self.items(seq) * math.sqrt(d) + self.position(recency)[None]
        x = self.drop(x) * valid[..., None]
        causal = torch.ones(n, n, dtype=torch.bool, device=seq.device).tril()
        own = torch.eye(n, dtype=torch.bool, device=seq.device)
        mask = (causal[None] & (valid[:, None, :] | own[None]))[:, None]  # [B, 1, n, n]
        for block in self.blocks:
            x = block(x, mask) * valid[..., None]
        return self.norm(x)


def windows(indptr: np.ndarray, items: np.ndarray, length: int, pad: int) -> np.ndarray:
    """int64 [W, length + 1]: every sequence cut from its end into right-aligned, left-padded
    windows that overlap by one item, so each item but a sequence's first is a target once."""
    n = np.diff(indptr)
    per_user = np.where(n >= 2, (n - 2) // length + 1, 0)  # ceil((n - 1) / length)
    user = np.repeat(np.arange(len(n)), per_user)
    k = np.arange(len(user)) - np.repeat(np.cumsum(per_user) - per_user, per_user)
    end = indptr[user] + n[user] - k * length  # one past the window's newest item
    start = np.maximum(end - length - 1, indptr[user])
    idx = end[:, None] - (length + 1) + np.arange(length + 1)[None, :]
    return np.where(idx >= start[:, None], items[np.maximum(idx, 0)], pad) if len(items) else idx


def latest(indptr: np.ndarray, items: np.ndarray, length: int, pad: int) -> np.ndarray:
    """int64 [n_users, length]: each user's newest `length` items, right-aligned, left-padded."""
    idx = indptr[1:, None] - length + np.arange(length)[None, :]
    return np.where(idx >= indptr[:-1, None], items[np.maximum(idx, 0)] if len(items) else pad, pad)


class SASRec(FittedVectors):
    kind = "sasrec"

    def __init__(self, config: SASRecConfig | None = None, device: str | torch.device = "cpu") -> None:
        self.config = config or SASRecConfig()
        self.device = torch.device(device)
        self.U: np.ndarray | None = None
        self.V: np.ndarray | None = None
        self.encoder: dict[str, np.ndarray] = {}

    def _loss(self, net: SASRecNet, seq: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        cfg = self.config
        used = int((seq[:, :-1] != net.pad).sum(1).max())  # drop columns that are padding in every row
        inp, tgt = seq[:, -used - 1 : -1], seq[:, -used:]
        keep = (inp != net.pad) & (tgt != net.pad)
        h, target = net(inp)[keep], tgt[keep]
        E = net.items.weight[: net.pad]
        if not cfg.negatives or cfg.negatives >= net.pad:
            return F.cross_entropy(h @ E.T, target)
        neg = torch.randint(0, net.pad, (cfg.negatives,), generator=gen).to(seq.device)
        logits = torch.cat([(h * E[target]).sum(1, keepdim=True), h @ E[neg].T], 1)
        logits[:, 1:] = logits[:, 1:].masked_fill(neg[None, :] == target[:, None], float("-inf"))
        return F.cross_entropy(logits, torch.zeros(len(target), dtype=torch.int64, device=seq.device))

    def fit(self, data: TrainData, callback: ProgressCallback | None = None) -> SASRec:
        cfg, dev = self.config, self.device
        indptr, items = chronological(data)
        net = seeded(cfg.seed, lambda: SASRecNet(data.n_items, cfg)).to(dev)
        train = torch.as_tensor(windows(indptr, items, cfg.max_len, data.n_items), device=dev)
        opt = torch.optim.Adam(net.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        gen = torch.Generator().manual_seed(cfg.seed)
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(cfg.seed)  # dropout draws from the global generator: seeded here, restored after
            for epoch in range(1, cfg.epochs + 1):
                net.train()
                total, steps = 0.0, 0
                for idx in batches(len(train), cfg.batch_size, gen):
                    loss = self._loss(net, train[idx.to(dev)], gen)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total += float(loss.detach())
                    steps += 1
                mean = total / max(steps, 1)
                check_finite(mean, self.kind, epoch)
                if callback is not None:
                    callback(epoch, {"loss": mean})
        self._infer(net, indptr, items, data.n_items)
        return self

    def _infer(self, net: SASRecNet, indptr: np.ndarray, items: np.ndarray, n_items: int) -> None:
        """Item vectors = the embedding table; user vectors = the output at each user's newest item."""
        net.eval()
        seqs = latest(indptr, items, self.config.max_len, n_items)
        has = np.diff(indptr) > 0
        parts = []
        with torch.inference_mode():
            for s in range(0, len(seqs), 4096):
                block = torch.as_tensor(seqs[s : s + 4096], device=self.device)
                parts.append(net(block)[:, -1].float().cpu().numpy())
        U = np.concatenate(parts) if parts else np.zeros((0, self.config.dim), dtype=np.float32)
        self.U = np.ascontiguousarray(np.where(has[:, None], U, 0.0), dtype=np.float32)  # no history: zeros
        self.V = net.items.weight[:n_items].detach().float().cpu().numpy().copy()
        self.encoder = {
            PREFIX + k: v.detach().float().cpu().numpy().copy()
            for k, v in net.state_dict().items()
            if not k.startswith("items.")
        }
        if not (np.isfinite(self.U).all() and np.isfinite(self.V).all()):
            check_finite(float("nan"), self.kind, self.config.epochs)

    def state(self) -> dict[str, np.ndarray]:
        return {**super().state(), **self.encoder}

    def load_state(self, state: dict[str, np.ndarray]) -> SASRec:
        super().load_state(state)
        self.encoder = {k: np.asarray(v, dtype=np.float32) for k, v in state.items() if k.startswith(PREFIX)}
        return self
