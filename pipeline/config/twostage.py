"""The `two_stage:` section of a tenant file: candidate sources and the learned ranker.

Off by default: the tenant's model alone ranks. On, the model becomes one candidate source
among several and a LightGBM LambdaRank model over features reorders the merged candidates
(pipeline/twostage/). It is judged like any challenger: evaluate scores it on the holdout,
the gate decides.
"""

from __future__ import annotations

from pydantic import Field, field_validator

from pipeline.config.models import _Strict

KNOWN_SOURCES = ("model", "cooccurrence", "segment_popularity")


class RankerConfig(_Strict):
    trees: int = Field(
        default=300, ge=1, le=5000, description="Boosting rounds at most (early stopping may use fewer)."
    )
    learning_rate: float = Field(default=0.05, gt=0, le=1)
    leaves: int = Field(default=15, ge=2, le=1024)
    min_data_in_leaf: int = Field(default=200, ge=1, description="Large: the labels are few and noisy.")
    early_stopping_rounds: int = Field(default=30, ge=1, description="On a share of the ranker's own users.")
    early_stopping_fraction: float = Field(default=0.2, gt=0, lt=1)
    threads: int = Field(default=1, ge=1, le=256)
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
