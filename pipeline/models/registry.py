"""Every model kind: its class, its config, how it scores, and how serving folds a user's new events in.

Every model class takes `(config, device)` (popularity takes nothing); configs live in
pipeline/config/models.py. Model modules are imported when a model is built, so this table
costs no torch import: serving asks it `scoring(kind)` and `fold_in(kind)` without loading a training stack.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pipeline.config.models import (
    ALSConfig,
    BPRConfig,
    EASEConfig,
    GraphSAGEConfig,
    ItemKNNConfig,
    LightGCNConfig,
    ModelBase,
    SASRecConfig,
    TwoTowerConfig,
    model_config,
)
from pipeline.models.base import Recommender

if TYPE_CHECKING:
    import torch

Scoring = Literal["dot", "item_item"]  # base.DotProduct or base.ItemItem
# How serving updates a user from events posted to the API, before the next release:
# "vector" re-solves their vector (ALS: models/als_fold.py); "seen_list" stores their new seen
# list, which is all an item-item kind scores from (X[u] @ S); "sequence" re-encodes the new seen
# list with the release's encoder (SASRec: models/sequence.py), no solve.
FoldIn = Literal["vector", "seen_list", "sequence"]


@dataclass(frozen=True)
class Kind:
    module: str  # pipeline.models.<module>, imported on first build (torch_geometric takes seconds)
    cls: str
    config: type[ModelBase] | None  # None: a baseline without parameters
    scoring: Scoring = "dot"
    fold_in: FoldIn | None = None  # None: posted events reach the user with the next release


KINDS: dict[str, Kind] = {
    "popularity": Kind("popularity", "Popularity", None),
    "als": Kind("als", "ALS", ALSConfig, fold_in="vector"),
    "bpr": Kind("bpr", "BPR", BPRConfig),
    "two_tower": Kind("two_tower", "TwoTower", TwoTowerConfig),
    "graphsage": Kind("graphsage", "GraphSAGE", GraphSAGEConfig),
    "lightgcn": Kind("graphsage", "LightGCN", LightGCNConfig),
    "ease": Kind("ease", "EASE", EASEConfig, scoring="item_item", fold_in="seen_list"),
    "item_knn": Kind("itemknn", "ItemKNN", ItemKNNConfig, scoring="item_item", fold_in="seen_list"),
    "sasrec": Kind("sasrec", "SASRec", SASRecConfig, fold_in="sequence"),
}


def kind(name: str) -> Kind:
    if name not in KINDS:
        raise ValueError(f"unknown model kind {name!r}; known: {sorted(KINDS)}")
    return KINDS[name]


def scoring(name: str) -> Scoring:
    """How models of this kind score: "dot" (user . item vectors) or "item_item" (X[u] @ S)."""
    return kind(name).scoring


def fold_in(name: str) -> FoldIn | None:
    """How serving folds a user's new events in at once (None: not at all, or an unknown kind)."""
    return KINDS[name].fold_in if name in KINDS else None


def folds_in(name: str) -> bool:
    """Whether serving folds a user's new events in at once (False for unknown kinds)."""
    return fold_in(name) is not None


def resolve_device(preference: str | None = None) -> torch.device:
    """RECSYS_DEVICE=cpu|cuda|auto (default auto: CUDA when present)."""
    import torch

    pref = (preference or os.environ.get("RECSYS_DEVICE", "auto")).lower()
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(pref)


def _make(name: str, config: ModelBase | None, device: torch.device) -> Recommender:
    spec = kind(name)
    cls: Any = getattr(importlib.import_module(f"pipeline.models.{spec.module}"), spec.cls)
    if spec.config is None:
        return cls()
    return cls(config or spec.config.model_validate({}), device=device)  # {}: the kind's defaults


def build(config: ModelBase, device: torch.device | None = None) -> Recommender:
    return _make(config.kind, config, device or resolve_device())


def build_by_kind(name: str, config: ModelBase | dict | None = None, device: torch.device | None = None) -> Recommender:
    """A model of kind `name` (for loading saved weights: CPU unless told otherwise)."""
    import torch

    if isinstance(config, dict) and kind(name).config is not None:
        config = model_config({**config, "kind": name})
    return _make(name, config if isinstance(config, ModelBase) else None, device or torch.device("cpu"))
