"""A fitted model as run artifacts: safetensors weights plus the JSON that rebuilds it.

Train writes one, refit another; evaluate, the gate, index and publish read them back here
(never through the training stage), as CPU models that score without a GPU.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from pipeline.models.base import Recommender
from pipeline.models.registry import build_by_kind
from pipeline.storage.paths import ModelArtifacts

if TYPE_CHECKING:
    from pipeline.context import RunContext


def model_meta(model: Recommender, config: dict[str, Any] | None, **extra: Any) -> dict[str, Any]:
    """What rebuilds the model: its kind and the exact configuration it was fitted with."""
    return {"kind": model.kind, "config": config, **extra}


def write_model(ctx: RunContext, where: ModelArtifacts, model: Recommender, meta: dict[str, Any]) -> None:
    ctx.write(where.weights, st_save(model.state(), metadata={"kind": model.kind}))
    ctx.write(where.meta, json.dumps(meta, indent=2, sort_keys=True).encode())


def read_meta(ctx: RunContext, where: ModelArtifacts) -> dict[str, Any]:
    return ctx.read_json(where.meta)


def read_model(ctx: RunContext, where: ModelArtifacts) -> Recommender:
    meta = read_meta(ctx, where)
    return from_bytes(meta, ctx.read(where.weights))


def from_bytes(meta: dict[str, Any], weights: bytes) -> Recommender:
    """A model from its meta document and safetensors bytes (releases carry the same pair)."""
    tensors = st_load(weights)
    model = build_by_kind(meta["kind"], meta.get("config") if meta["kind"] != "popularity" else None)
    return model.load_state({k: np.asarray(v) for k, v in tensors.items()})
