"""Model selection: a seeded Optuna search on a validation split carved from the train events."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config.models import ALSConfig, SearchRange
from pipeline.config.tenant import TenantConfigError
from pipeline.context import RunContext
from pipeline.features import dataset
from pipeline.models.io import read_model
from pipeline.stages import run_all
from pipeline.storage import paths
from pipeline.training import fit, select
from tests.conftest import INTERVAL_END, write_tenant


def test_one_fixed_candidate_fits_nothing(ctx):
    run_all(ctx, until="features")
    result = select.select(ctx)
    assert result == {"config": ctx.config.model.fixed().model_dump(mode="json"), "searched": False}


def test_validation_split_never_touches_the_holdout(ctx):
    run_all(ctx, until="features")
    feats = dataset.Features.read(ctx)
    data, relevant, exclude = select.validation_split(feats, 0.2)
    holdout = feats.matrix(True)
    train = feats.matrix(False)
    assert relevant.nnz > 0
    # every validation pair and every fit pair is a train pair; holdout-only pairs appear nowhere
    assert (relevant.multiply(train) != relevant).nnz == 0
    assert (exclude.multiply(train) != exclude).nnz == 0
    holdout_only = holdout - holdout.multiply(train)
    assert relevant.multiply(holdout_only).nnz == 0 and exclude.multiply(holdout_only).nnz == 0
    assert len(data.user_idx) + relevant.nnz <= len(feats.split(False))


def test_search_picks_the_best_candidate_deterministically(settings, small_df):
    cfg = write_tenant(
        settings,
        "acme",
        small_df,
        selection={
            "trials": 4,
            "candidates": [
                {"kind": "als", "factors": 1, "iterations": 2, "regularization": 500.0},  # hopeless
                {
                    "kind": "als",
                    "iterations": 4,
                    "search": {"factors": {"low": 4, "high": 32, "int": True, "log": True}},
                },
            ],
        },
    )
    ctx = RunContext(config=cfg, interval_end=INTERVAL_END, settings=settings)
    run_all(ctx, until="features")
    first = select.select(ctx)
    again = select.select(ctx)
    assert first["searched"] and first["candidates"][1]["trials"] == 4
    assert first["config"]["kind"] == "als" and 4 <= first["config"]["factors"] <= 32
    assert first["value"] == max(c["value"] for c in first["candidates"]) > first["candidates"][0]["value"]
    assert [c["value"] for c in again["candidates"]] == [c["value"] for c in first["candidates"]]
    assert again["config"] == first["config"]
    # train uses the chosen configuration
    out = run_all(ctx, until="train")
    assert out["train"]["kind"] == "als"
    assert fit.chosen_config(ctx).factors == first["config"]["factors"]


def test_search_ranges_are_checked():
    with pytest.raises(ValueError, match="unknown parameter"):
        ALSConfig(search={"no_such_knob": [1, 2]})
    with pytest.raises(ValueError, match="low"):
        SearchRange(low=5, high=1)
    with pytest.raises(ValueError, match="log range"):
        SearchRange(low=0, high=1, log=True)


def test_bad_candidate_is_a_config_error(settings, small_df):
    with pytest.raises(TenantConfigError, match="selection.candidates"):
        write_tenant(settings, "acme", small_df, selection={"candidates": [{"kind": "nope"}]})


def test_with_params_validates(small_df):
    cand = ALSConfig(search={"factors": SearchRange(low=2, high=8, int=True)})
    assert select.with_params(cand, {"factors": 5}).factors == 5
    with pytest.raises(ValueError):
        select.with_params(cand, {"factors": -1})
    assert np.isclose(select.with_params(cand, {"alpha": 2.5}).alpha, 2.5)


def test_item_item_kinds_are_selected_trained_and_evaluated(settings, small_df):
    cfg = write_tenant(
        settings,
        "acme",
        small_df,
        selection={
            "trials": 3,
            "candidates": [
                {"kind": "als", "factors": 1, "iterations": 2, "regularization": 500.0},  # hopeless
                {"kind": "item_knn", "search": {"neighbours": {"low": 5, "high": 60, "int": True}}},
                {"kind": "ease", "regularization": 50.0, "neighbours": 40},
            ],
        },
    )
    ctx = RunContext(config=cfg, interval_end=INTERVAL_END, settings=settings)
    out = run_all(ctx, until="evaluate")
    chosen = out["select"]["config"]["kind"]
    values = [c["value"] for c in out["select"]["candidates"]]
    assert chosen in ("item_knn", "ease") and max(values[1:]) > values[0]
    assert out["train"]["kind"] == chosen and out["evaluate"]["model"] == chosen
    assert out["evaluate"]["metrics"][chosen]["ndcg@10"] > out["evaluate"]["metrics"]["popularity"]["ndcg@10"]
    model = read_model(ctx, paths.TRAINED)  # the evaluated model, back from safetensors
    assert model.kind == chosen and model.similarity().shape == (dataset.Features.read(ctx).n_items,) * 2
