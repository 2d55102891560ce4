from pipeline.models.base import ProgressCallback, Recommender, TrainData, TrainingDiverged
from pipeline.models.registry import build, build_by_kind, resolve_device

__all__ = [
    "ProgressCallback",
    "Recommender",
    "TrainData",
    "TrainingDiverged",
    "build",
    "build_by_kind",
    "resolve_device",
]
