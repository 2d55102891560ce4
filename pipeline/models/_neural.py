"""Torch parts the neural models share: seeded construction, the item attribute encoder,
mini-batch order, the loss check. Pure tensor code; the caller passes the device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import TypeVar

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from pipeline.models.base import ItemFeatures, TrainingDiverged

M = TypeVar("M", bound=nn.Module)


def seeded(seed: int, build: Callable[[], M]) -> M:
    """Build a module with parameters drawn from `seed` (on CPU), leaving the global RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def batches(n: int, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """A seeded permutation of range(n) in mini-batches (CPU int64)."""
    order = torch.randperm(n, generator=gen)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


class Adam:
    """Adam for the dense parameters and lazy SparseAdam for sparse embedding tables: a step
    then costs O(rows touched), not O(users + items). Weight decay applies to dense ones only."""

    def __init__(self, module: nn.Module, lr: float, weight_decay: float = 0.0) -> None:
        tables = [m for m in module.modules() if isinstance(m, nn.Embedding | nn.EmbeddingBag) and m.sparse]
        sparse = [p for m in tables for p in m.parameters()]
        dense = [p for p in module.parameters() if id(p) not in {id(q) for q in sparse}]
        self.optimizers: list[torch.optim.Optimizer] = []
        if dense:
            self.optimizers.append(torch.optim.Adam(dense, lr=lr, weight_decay=weight_decay))
        if sparse:
            self.optimizers.append(torch.optim.SparseAdam(sparse, lr=lr))

    def step(self, loss: torch.Tensor) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in self.optimizers:
            opt.step()


def check_finite(loss: float, model: str, epoch: int) -> None:
    if not math.isfinite(loss):
        raise TrainingDiverged(f"{model} loss is {loss} at epoch {epoch}")


class Bags(nn.Module):
    """Rows of a CSR matrix as EmbeddingBag input: rows(items) -> (flat ids, offsets)."""

    indptr: torch.Tensor  # buffers (register_buffer), declared for type checkers
    indices: torch.Tensor

    def __init__(self, matrix: sp.csr_matrix) -> None:
        super().__init__()
        self.width = matrix.shape[1]
        self.register_buffer("indptr", torch.as_tensor(matrix.indptr.astype(np.int64)), persistent=False)
        self.register_buffer("indices", torch.as_tensor(matrix.indices.astype(np.int64)), persistent=False)

    def rows(self, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.indptr[items]
        length = self.indptr[items + 1] - start
        offsets = torch.cumsum(length, 0) - length
        total = int(length.sum())
        pos = torch.arange(total, device=items.device) - torch.repeat_interleave(offsets, length, output_size=total)
        return self.indices[torch.repeat_interleave(start, length, output_size=total) + pos], offsets


class ItemAttributes(nn.Module):
    """Category embedding + mean tag embedding + mean hashed-title-token embedding of items.

    Each part is zero for an item without it, so an item with no attributes gets a zero vector.
    """

    category_code: torch.Tensor  # a buffer (register_buffer)

    def __init__(self, features: ItemFeatures, dim: int, init_std: float) -> None:
        super().__init__()
        n_categories = int(features.category.max()) + 1 if len(features.category) else 0
        self.register_buffer("category_code", torch.as_tensor(features.category + 1), persistent=False)
        self.category = nn.Embedding(n_categories + 1, dim, padding_idx=0, sparse=True)
        self.tag_rows = Bags(features.tags)
        self.tags = nn.EmbeddingBag(max(features.tags.shape[1], 1), dim, mode="mean", sparse=True)
        self.token_rows = Bags(features.tokens)
        self.tokens = nn.EmbeddingBag(max(features.tokens.shape[1], 1), dim, mode="mean", sparse=True)
        for emb in (self.category, self.tags, self.tokens):
            nn.init.normal_(emb.weight, std=init_std)
        with torch.no_grad():
            self.category.weight[0].zero_()

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        out = self.category(self.category_code[items])
        out = out + self.tags(*self.tag_rows.rows(items))
        return out + self.tokens(*self.token_rows.rows(items))


def chunked(fn: Callable[[torch.Tensor], torch.Tensor], n: int, device: torch.device, chunk: int = 65536) -> np.ndarray:
    """fn over range(n) in chunks, under inference mode, as float32 numpy."""
    with torch.inference_mode():
        parts = [fn(torch.arange(s, min(s + chunk, n), device=device)).float().cpu() for s in range(0, n, chunk)]
    return torch.cat(parts).numpy() if parts else np.zeros((0, 0), dtype=np.float32)


class FittedVectors:
    """Fitted vectors (numpy, float32) and their persistence, shared by the neural models."""

    kind = ""
    U: np.ndarray | None = None
    V: np.ndarray | None = None

    def user_vectors(self) -> np.ndarray:
        assert self.U is not None, "fit first"
        return self.U

    def item_vectors(self) -> np.ndarray:
        assert self.V is not None, "fit first"
        return self.V

    def state(self) -> dict[str, np.ndarray]:
        return {"user_vectors": self.user_vectors(), "item_vectors": self.item_vectors()}

    def load_state(self, state: dict[str, np.ndarray]):
        self.U = np.asarray(state["user_vectors"], dtype=np.float32)
        self.V = np.asarray(state["item_vectors"], dtype=np.float32)
        return self

    def _set(self, H: np.ndarray, n_users: int) -> None:
        if not np.isfinite(H).all():
            check_finite(float("nan"), self.kind, -1)
        self.U, self.V = np.ascontiguousarray(H[:n_users]), np.ascontiguousarray(H[n_users:])
