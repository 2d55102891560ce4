"""The `two_stage:` section of a tenant file: candidate sources and the learned ranker.

Off by default: the tenant's model alone ranks. On, the model becomes one candidate source
among several and a learned ranker over features reorders the merged candidates
(pipeline/twostage/). It is judged like any challenger: evaluate scores it on the holdout,
the gate decides.
"""

from __future__ import annotations

from pydantic import Field, field_validator

from pipeline.config.models import _Strict

KNOWN_SOURCES = ("model", "cooccurrence", "segment_popularity")


class RankerConfig(_Strict):
    """The second stage: a 2-layer MLP, listwise softmax loss, full-batch Adam (pipeline/twostage/ranker.py)."""

    hidden: int = Field(default=64, ge=1, le=4096)
    epochs: int = Field(default=60, ge=1, le=10_000)
    learning_rate: float = Field(default=3e-3, gt=0, le=1)
    weight_decay: float = Field(default=1e-5, ge=0)
    seed: int = 0


class TwoStageConfig(_Strict):
    enabled: bool = False
    sources: dict[str, int] = Field(
        default={"model": 100, "cooccurrence": 50, "segment_popularity": 30},
        description="Candidate source -> items it proposes per user: model, cooccurrence, segment_popularity.",
    )
    validation_fraction: float = Field(
        default=0.2,
        gt=0,
        lt=1,
        description="Last share of each user's TRAIN events the ranker learns to find (never the holdout).",
    )
    max_training_users: int = Field(
        default=20_000, ge=1, description="Users the ranker learns from at most (a seeded sample): bounds its rows."
    )
    recent_items: int = Field(default=20, ge=1, description="Newest distinct items co-occurrence looks from.")
    recent_decay: float = Field(default=0.9, gt=0, le=1, description="Weight of the n-th newest item: decay**n.")
    neighbours: int = Field(default=100, ge=1, description="Co-occurring items kept per item.")
    segments: int = Field(default=4, ge=1, le=100, description="Activity buckets for segment popularity.")
    half_life_days: float = Field(default=30.0, gt=0, description="Recency half-life of segment popularity.")
    ranker: RankerConfig = RankerConfig()

    @field_validator("sources")
    @classmethod
    def _known(cls, value: dict[str, int]) -> dict[str, int]:
        unknown = sorted(set(value) - set(KNOWN_SOURCES))
        if unknown:
            raise ValueError(f"unknown candidate source(s) {unknown}; known: {list(KNOWN_SOURCES)}")
        if not value:
            raise ValueError("at least one candidate source")
        if any(n < 1 or n > 1000 for n in value.values()):
            raise ValueError("each source proposes between 1 and 1000 items per user")
        # one canonical order: it is the order of the ranker's feature columns, and a config
        # snapshot (JSON with sorted keys) must not permute them
        return {name: value[name] for name in KNOWN_SOURCES if name in value}

    def knobs(self) -> dict[str, float | int]:
        """What the sources are built with (candidates.SourceContext)."""
        return {
            "recent_items": self.recent_items,
            "recent_decay": self.recent_decay,
            "neighbours": self.neighbours,
            "segments": self.segments,
            "half_life_days": self.half_life_days,
        }
