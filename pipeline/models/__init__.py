"""Model kinds behind one interface (base.py) and one table of kinds (registry.py).

Importing this package loads no torch: model modules are imported when a model is built,
so serving can use pipeline.models.registry, .als_fold and .itemitem (numpy only).
"""

from pipeline.models.base import DotProduct, ItemItem, ProgressCallback, Recommender, TrainData, TrainingDiverged
from pipeline.models.registry import build, build_by_kind, resolve_device

__all__ = [
    "DotProduct",
    "ItemItem",
    "ProgressCallback",
    "Recommender",
    "TrainData",
    "TrainingDiverged",
    "build",
    "build_by_kind",
    "resolve_device",
]
