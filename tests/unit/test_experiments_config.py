"""Experiment configuration and assignment: stable, uniform, independent, and validated."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats

from pipeline.config import TenantConfigError, load_tenant_file
from pipeline.config.experiments import ExperimentConfig
from pipeline.experiments.assign import arm_of, assign, unit

USERS = [f"user-{i}" for i in range(100_000)]


def _exp(name: str, shares=(0.5, 0.5), **kw) -> ExperimentConfig:
    arms = [{"name": f"a{i}", "share": s} for i, s in enumerate(shares)]
    return ExperimentConfig.model_validate({"name": name, "arms": arms, **kw})


def test_assignment_is_uniform_over_100k_ids():
    e = _exp("uniform", shares=(0.2, 0.3, 0.5))
    counts = collections.Counter(arm_of("acme", e, u).name for u in USERS)
    observed = [counts[f"a{i}"] for i in range(3)]
    expected = [0.2 * len(USERS), 0.3 * len(USERS), 0.5 * len(USERS)]
    assert stats.chisquare(observed, expected).pvalue > 0.001, observed


def test_assignment_is_stable_and_salt_reshuffles():
    e = _exp("stable")
    first = [arm_of("acme", e, u).name for u in USERS[:2000]]
    again = [arm_of("acme", _exp("stable"), u).name for u in USERS[:2000]]  # another config object, same inputs
    assert first == again
    # pinned values: the same in every process, machine and Python (blake2b, not hash())
    assert first[:8] == ["a1", "a1", "a0", "a0", "a0", "a1", "a0", "a1"]
    assert unit("acme", "stable", "", "user-0") == pytest.approx(0.9981425068485731, abs=1e-15)
    salted = [arm_of("acme", _exp("stable", salt="v2"), u).name for u in USERS[:2000]]
    moved = np.mean([a != b for a, b in zip(first, salted, strict=True)])
    assert 0.4 < moved < 0.6  # an independent re-draw moves half the users of a 50/50 split
    other_tenant = [arm_of("other", e, u).name for u in USERS[:2000]]
    assert 0.4 < np.mean([a != b for a, b in zip(first, other_tenant, strict=True)]) < 0.6


def test_assignment_is_independent_across_experiments():
    a, b = _exp("first"), _exp("second", shares=(0.3, 0.7))
    table = np.zeros((2, 2))
    for u in USERS:
        table[int(arm_of("acme", a, u).name[1]), int(arm_of("acme", b, u).name[1])] += 1
    assert stats.chi2_contingency(table).pvalue > 0.001, table


def test_traffic_slices_are_disjoint_and_sized():
    exps = load_experiments(
        [
            {"name": "x", "traffic": 0.2, "arms": [{"name": "c", "share": 0.5}, {"name": "t", "share": 0.5}]},
            {"name": "y", "traffic": 0.3, "arms": [{"name": "c", "share": 0.5}, {"name": "t", "share": 0.5}]},
        ]
    )
    assert [(e.offset, e.end) for e in exps] == [(0.0, 0.2), pytest.approx((0.2, 0.5))]
    got = collections.Counter(None if (a := assign("acme", exps, u)) is None else a.experiment.name for u in USERS)
    assert stats.chisquare([got["x"], got["y"], got[None]], [20_000, 30_000, 50_000]).pvalue > 0.001


def load_experiments(experiments, **extra):
    from pipeline.config import TenantConfig

    return TenantConfig.model_validate(
        {"tenant": "acme", "source": {"uri": "x.csv"}, "experiments": experiments, **extra}
    ).live_experiments()


ARMS = [{"name": "control", "share": 0.5}, {"name": "diverse", "share": 0.5, "diversity": 0.3}]


@pytest.mark.parametrize(
    ("experiments", "extra", "message"),
    [
        ([{"name": "e", "arms": [{"name": "a", "share": 0.5}, {"name": "b", "share": 0.4}]}], {}, "sum to 0.9"),
        ([{"name": "e", "arms": [{"name": "a", "share": 1.0}]}], {}, "at least 2"),
        ([{"name": "e", "arms": ARMS}, {"name": "f", "offset": 0.5, "traffic": 0.2, "arms": ARMS}], {}, "both claim"),
        ([{"name": "e", "traffic": 0.5, "arms": ARMS}, {"name": "e", "traffic": 0.5, "arms": ARMS}], {}, "also"),
        (
            [{"name": "e", "arms": [{"name": "a", "share": 0.5}, {"name": "b", "share": 0.5, "release": "x/y"}]}],
            {},
            "release",
        ),  # fmt: skip
        (
            [
                {
                    "name": "e",
                    "arms": [{"name": "a", "share": 0.5}, {"name": "b", "share": 0.5, "release": "challenger"}],
                }
            ],
            {},
            "challenger.mode",
        ),  # fmt: skip
        ([{"name": "e", "arms": ARMS}], {"challenger": {"mode": "challenger", "share": 0.1}}, "challenger.share"),
        ([{"name": "e", "interleave": True, "arms": [*ARMS, {"name": "c", "share": 0.0001}]}], {}, "sum to"),
        ([{"name": "e", "control": "nope", "arms": ARMS}], {}, "control 'nope'"),
    ],
)
def test_mistakes_name_file_field_and_reason(tmp_path: Path, experiments, extra, message):
    path = tmp_path / "acme.yaml"
    path.write_text(yaml.safe_dump({"tenant": "acme", "source": {"uri": "x.csv"}, "experiments": experiments, **extra}))
    with pytest.raises(TenantConfigError) as err:
        load_tenant_file(path)
    text = str(err.value)
    assert str(path) in text and message in text, text


def test_challenger_mode_adds_a_balanced_experiment_after_the_configured_ones():
    exps = load_experiments(
        [{"name": "e", "traffic": 0.5, "arms": ARMS}], challenger={"mode": "challenger", "share": 0.1}
    )
    assert [e.name for e in exps] == ["e", "challenger"]
    ch = exps[1]
    assert (ch.offset, ch.traffic) == (0.5, pytest.approx(0.2))
    assert [(a.name, a.release, a.share) for a in ch.arms] == [
        ("control", "live", 0.5),
        ("challenger", "challenger", 0.5),
    ]


def test_an_unknown_pinned_release_is_named_with_its_field(tmp_path):
    from pipeline.config import TenantConfig
    from pipeline.experiments.report import unknown_releases
    from pipeline.storage import open_store

    cfg = TenantConfig.model_validate(
        {"tenant": "acme", "source": {"uri": "x.csv"},
         "experiments": [{"name": "e", "arms": [ARMS[0], {"name": "old", "share": 0.5, "release": "r1-abc"}]}]}
    )  # fmt: skip
    store = open_store(str(tmp_path))
    [problem] = unknown_releases(store, cfg)
    assert "experiments[0].arms[1].release" in problem and "unknown release 'r1-abc'" in problem
    store.put("tenants/acme/releases/r1-abc/manifest.json", b"{}")
    assert unknown_releases(store, cfg) == []
