"""Maps `model.kind` to its class, and resolves the torch device once.

Every model class takes `(config, device)`; configs live in pipeline/config/models.py.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from pipeline.config.models import ALSConfig, BPRConfig, ModelBase, model_config
from pipeline.models.als import ALS
from pipeline.models.base import Recommender
from pipeline.models.bpr import BPR
from pipeline.models.popularity import Popularity


def _two_tower():
    from pipeline.models import two_tower

    return two_tower


def _graph():  # imported on use: torch_geometric takes seconds to import
    from pipeline.models import graphsage

    return graphsage


# kind -> factory(config, device). Baselines without a config take none.
KINDS: dict[str, Callable[[ModelBase | None, torch.device], Recommender]] = {
    "popularity": lambda _cfg, _dev: Popularity(),
    "als": lambda cfg, dev: ALS(cfg or ALSConfig(), device=dev),
    "bpr": lambda cfg, dev: BPR(cfg or BPRConfig(), device=dev),
    "two_tower": lambda cfg, dev: _two_tower().TwoTower(cfg, device=dev),
    "graphsage": lambda cfg, dev: _graph().GraphSAGE(cfg, device=dev),
    "lightgcn": lambda cfg, dev: _graph().LightGCN(cfg, device=dev),
}


def resolve_device(preference: str | None = None) -> torch.device:
    """RECSYS_DEVICE=cpu|cuda|auto (default auto: CUDA when present)."""
    pref = (preference or os.environ.get("RECSYS_DEVICE", "auto")).lower()
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(pref)


def build(config: ModelBase, device: torch.device | None = None) -> Recommender:
    kind = config.kind  # type: ignore[attr-defined]
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; known: {sorted(KINDS)}")
    return KINDS[kind](config, device or resolve_device())


def build_by_kind(kind: str, config: ModelBase | dict | None = None, device: torch.device | None = None) -> Recommender:
    """A model of `kind` (for loading saved weights: CPU unless told otherwise)."""
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; known: {sorted(KINDS)}")
    if isinstance(config, dict):
        config = model_config({**config, "kind": kind})
    return KINDS[kind](config, device or torch.device("cpu"))
