"""Online experiments of a tenant (`experiments:` and `challenger:` in the tenant YAML).

An experiment claims a slice of the tenant's users (`traffic`, placed at `offset` on one line
from 0 to 1 that every experiment of the tenant shares, so two experiments never claim one
user) and splits it between two or more arms. An arm is a serving policy: the live release,
the challenger (a release the gate published without making it live), a pinned release id,
or the live release with other serving options. Assignment is a salted hash, no state
(`pipeline/experiments/assign.py`). Errors name the field and the reason; the tenant loader
adds the file.
"""

from __future__ import annotations

import math
from datetime import date
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, model_validator

from pipeline.config.models import _Strict

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,39}$"
RELEASE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
LIVE, CHALLENGER = "live", "challenger"
SHARE_TOLERANCE = 1e-9


class ArmConfig(_Strict):
    """One serving policy; users of the arm get exactly this (and their impressions say so)."""

    name: str = Field(pattern=NAME_PATTERN)
    share: float = Field(gt=0, le=1, description="Share of the experiment's users; the arms' shares sum to 1.")
    release: str = Field(
        default=LIVE,
        pattern=RELEASE_PATTERN,
        description="live (the tenant's live release), challenger (the release the gate published as "
        "challenger), or a release id of tenants/{t}/releases/ (pinned).",
    )
    diversity: float | None = Field(default=None, ge=0, le=1, description="Serving option for this arm (MMR).")
    max_per_category: int | None = Field(default=None, ge=1, le=100, description="Serving option for this arm.")

    def options(self) -> dict[str, Any]:
        """The serving options this arm sets over the request's (none: the request's own)."""
        return {
            k: v
            for k, v in (("diversity", self.diversity), ("max_per_category", self.max_per_category))
            if v is not None
        }

    @property
    def pinned_release(self) -> str | None:
        return None if self.release in (LIVE, CHALLENGER) else self.release


class ExperimentConfig(_Strict):
    name: str = Field(pattern=NAME_PATTERN)
    traffic: float = Field(default=1.0, gt=0, le=1, description="Share of the tenant's users in the experiment.")
    offset: float | None = Field(
        default=None,
        ge=0,
        lt=1,
        description="Start of the experiment's slice of the tenant's users (0..1); default: where the "
        "previous experiment's slice ends. Fix it to add experiments without moving users.",
    )
    salt: str = Field(default="", max_length=64, description="Change it to reshuffle users between arms.")
    arms: list[ArmConfig] = Field(min_length=2, max_length=10)
    control: str | None = Field(default=None, description="The arm others are compared with (default: the first).")
    interleave: bool = Field(
        default=False,
        description="Team-draft interleaving of the two arms in one list (per-item credit) instead of an A/B split.",
    )
    outcome_event: str = Field(
        default="click", min_length=1, max_length=64, description="Event type counted as a click."
    )
    conversion_event: str = Field(default="purchase", min_length=1, max_length=64)
    start: date | None = Field(default=None, description="First day the analysis reads (default: all impressions).")
    min_users: int = Field(default=100, ge=1, description="Users per arm before a verdict other than 'not yet'.")
    confidence: float = Field(default=0.95, gt=0.5, lt=1)

    @model_validator(mode="after")
    def _arms(self) -> ExperimentConfig:
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names):
            raise ValueError(f"experiment {self.name!r}: arm names must be distinct, got {names}")
        total = math.fsum(a.share for a in self.arms)
        if abs(total - 1.0) > SHARE_TOLERANCE:
            raise ValueError(f"experiment {self.name!r}: arm shares sum to {total:g}, they must sum to 1")
        if self.control is not None and self.control not in names:
            raise ValueError(f"experiment {self.name!r}: control {self.control!r} is not one of its arms {names}")
        if self.interleave and len(self.arms) != 2:
            raise ValueError(f"experiment {self.name!r}: interleave needs exactly two arms, got {len(self.arms)}")
        return self

    @property
    def end(self) -> float:
        """End of the experiment's slice of the users (offset resolved by `_place`)."""
        return (self.offset or 0.0) + self.traffic

    @property
    def control_arm(self) -> str:
        return self.control or self.arms[0].name

    def arm(self, name: str) -> ArmConfig:
        for a in self.arms:
            if a.name == name:
                return a
        raise KeyError(f"experiment {self.name!r} has no arm {name!r}")


def _place(experiments: list[ExperimentConfig]) -> list[ExperimentConfig]:
    """Every experiment with its offset resolved; refuses overlapping slices and repeated names."""
    out, end = [], 0.0
    for e in experiments:
        offset = end if e.offset is None else e.offset
        if offset + e.traffic > 1.0 + SHARE_TOLERANCE:
            raise ValueError(
                f"experiment {e.name!r}: offset {offset:g} + traffic {e.traffic:g} is over 1 (the tenant's users)"
            )
        out.append(e.model_copy(update={"offset": offset}))
        end = offset + e.traffic
    seen: dict[str, int] = {}
    for i, e in enumerate(out):
        if e.name in seen:
            raise ValueError(f"experiments[{i}]: name {e.name!r} is also experiments[{seen[e.name]}]'s")
        seen[e.name] = i
        for j, other in enumerate(out[:i]):
            lo, hi = max(e.offset or 0.0, other.offset or 0.0), min(e.end, other.end)
            if hi - lo > SHARE_TOLERANCE:
                raise ValueError(
                    f"experiments[{i}] {e.name!r} and experiments[{j}] {other.name!r} both claim the users "
                    f"in [{lo:g}, {hi:g}): two experiments cannot claim one user (set traffic/offset apart)"
                )
    return out


Experiments = Annotated[list[ExperimentConfig], AfterValidator(_place)]


class ChallengerConfig(_Strict):
    """How the gate's accepted release goes out: live at once, or first as a challenger to N% of users."""

    mode: Literal["live", "challenger"] = Field(
        default="live",
        description="live: publish moves the pointer (as always). challenger: publish records the release as "
        "the challenger; `python -m pipeline experiment promote` makes it live.",
    )
    share: float = Field(
        default=0.1,
        gt=0,
        le=0.5,
        description="Users served the challenger; as many again form its control arm (the live release).",
    )


def implicit_challenger(cfg: ChallengerConfig, explicit: list[ExperimentConfig]) -> ExperimentConfig | None:
    """The experiment `challenger` mode adds when no configured arm serves the challenger."""
    if cfg.mode != CHALLENGER or any(a.release == CHALLENGER for e in explicit for a in e.arms):
        return None
    end = max((e.end for e in explicit), default=0.0)
    return ExperimentConfig(
        name=CHALLENGER,
        traffic=2 * cfg.share,
        offset=end,
        arms=[ArmConfig(name="control", share=0.5), ArmConfig(name=CHALLENGER, share=0.5, release=CHALLENGER)],
    )


def effective(experiments: list[ExperimentConfig], challenger: ChallengerConfig) -> list[ExperimentConfig]:
    """The tenant's experiments as serving runs them: the configured ones plus the implicit challenger's."""
    extra = implicit_challenger(challenger, experiments)
    return experiments if extra is None else _place([*experiments, extra])


def check(experiments: list[ExperimentConfig], challenger: ChallengerConfig) -> None:
    """Cross-field rules (raised as ValueError, the loader names the file)."""
    try:
        effective(experiments, challenger)
    except ValueError as exc:
        raise ValueError(
            f"challenger.share {challenger.share:g} needs {2 * challenger.share:g} of the users after the "
            f"configured experiments: {exc}"
        ) from None
    if challenger.mode == LIVE:
        for i, e in enumerate(experiments):
            for a in e.arms:
                if a.release == CHALLENGER:
                    raise ValueError(
                        f"experiments[{i}] {e.name!r} arm {a.name!r} serves the challenger, but challenger.mode "
                        "is 'live' (the gate never publishes one): set challenger.mode: challenger"
                    )
