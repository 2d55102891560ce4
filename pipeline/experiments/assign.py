"""Deterministic assignment: a salted hash of (tenant, experiment, user id) picks the arm.

No state is stored and nothing depends on the release or the process, so a user keeps their
arm across restarts, replicas and releases. Two hashes: the tenant's traffic line (which
experiment, if any, claims the user: `experiments` slices are disjoint by validation) and the
experiment's own (which arm; keyed by its name and `salt`, so experiments are independent and
changing the salt reshuffles on purpose). blake2b, 64 bits: uniform to far below any share
anyone configures.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from pipeline.config.experiments import ArmConfig, ExperimentConfig

SEP = "\x1f"  # cannot appear in a tenant id or experiment name; user ids may hold anything else
SCALE = float(2**64)


def unit(*parts: str) -> float:
    """A point of [0, 1) for the parts, the same on every machine and Python version."""
    digest = hashlib.blake2b(SEP.join(parts).encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / SCALE


@dataclass(frozen=True)
class Assignment:
    experiment: ExperimentConfig
    arm: ArmConfig


def traffic_point(tenant: str, user_id: str) -> float:
    """Where the user sits on the tenant's traffic line (shared by all its experiments)."""
    return unit(tenant, "traffic", user_id)


def arm_of(tenant: str, experiment: ExperimentConfig, user_id: str) -> ArmConfig:
    """The arm of a user inside the experiment (whether or not the traffic line puts them in it)."""
    u = unit(tenant, experiment.name, experiment.salt, user_id)
    edge = 0.0
    for arm in experiment.arms:  # a handful of arms
        edge += arm.share
        if u < edge:
            return arm
    return experiment.arms[-1]  # shares sum to 1 up to rounding


def assign(tenant: str, experiments: list[ExperimentConfig], user_id: str) -> Assignment | None:
    """The user's experiment and arm, or None: outside every experiment (the default policy)."""
    point = traffic_point(tenant, user_id)
    for e in experiments:
        if (e.offset or 0.0) <= point < e.end:
            return Assignment(e, arm_of(tenant, e, user_id))
    return None
