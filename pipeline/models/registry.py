"""Maps `model.kind` in the tenant YAML to a class, and resolves the torch device once."""

from __future__ import annotations

import os

import torch

from pipeline.config.tenant import ALSConfig
from pipeline.models.als import ALS
from pipeline.models.base import Recommender
from pipeline.models.popularity import Popularity


def resolve_device(preference: str | None = None) -> torch.device:
    """RECSYS_DEVICE=cpu|cuda|auto (default auto: CUDA when present)."""
    pref = (preference or os.environ.get("RECSYS_DEVICE", "auto")).lower()
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(pref)


def build(config: ALSConfig, device: torch.device | None = None) -> Recommender:
    device = device or resolve_device()
    if config.kind == "als":
        return ALS(config, device=device)
    raise ValueError(f"unknown model kind {config.kind!r}")


def build_by_kind(kind: str, config: ALSConfig | None = None, device: torch.device | None = None) -> Recommender:
    if kind == "popularity":
        return Popularity()
    if kind == "als":
        return ALS(config or ALSConfig(), device=device or torch.device("cpu"))
    raise ValueError(f"unknown model kind {kind!r}")
