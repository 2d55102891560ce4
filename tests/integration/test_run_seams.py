"""The seams between stages: declared artifacts only, one config per run, the manifest tells the truth."""

from __future__ import annotations

import pytest
import yaml

from pipeline.config import load_tenant_file
from pipeline.context import RunContext, StageError, StageIO, UndeclaredArtifact
from pipeline.release import format as release
from pipeline.stages import STAGES, run_all, run_stage
from pipeline.storage import paths
from tests.conftest import INTERVAL_END, write_tenant


def test_manifest_records_the_configuration_selection_chose(settings, small_df):
    """`model` says 16 factors; selection picks another candidate: the release must say what was fitted."""
    chosen = {"kind": "als", "factors": 24, "iterations": 6, "regularization": 0.05}
    cfg = write_tenant(
        settings,
        "acme",
        small_df,
        selection={"candidates": [{"kind": "als", "factors": 1, "iterations": 2, "regularization": 500.0}, chosen]},
        gate={"require_beat_popularity": False},  # this test is about what the manifest says, not the gate
    )
    ctx = RunContext(config=cfg, interval_end=INTERVAL_END, settings=settings)
    results = run_all(ctx)
    assert results["select"]["candidates"][1]["value"] > results["select"]["candidates"][0]["value"]
    manifest = release.read_manifest(ctx.store, "acme", results["publish"]["release_id"])
    assert cfg.model.factors == 16
    assert manifest["model_config"]["factors"] == 24 and manifest["model_config"]["regularization"] == 0.05
    fitted, selected = ctx.read_json(paths.REFITTED.meta)["config"], ctx.read_json(paths.SELECTED_CONFIG)
    assert manifest["model_config"] == fitted == {k: v for k, v in selected.items() if k != "search"}


def test_a_tenant_file_edited_mid_run_does_not_mix_configs(settings, small_df):
    """Each Airflow task loads the YAML anew; every stage after the first runs with the run's snapshot."""
    cfg = write_tenant(settings, "acme", small_df)
    path = settings.tenants_dir / "acme.yaml"
    run_stage("extract", RunContext(config=load_tenant_file(path), interval_end=INTERVAL_END, settings=settings))
    doc = yaml.safe_load(path.read_text())
    doc["model"] = {"factors": 4, "iterations": 2}
    doc["evaluation"] = {"k": 5}
    path.write_text(yaml.safe_dump(doc))  # someone edits the tenant mid-run
    for name in STAGES[1 : STAGES.index("evaluate") + 1]:
        ctx = RunContext(config=load_tenant_file(path), interval_end=INTERVAL_END, settings=settings)
        assert ctx.config.model.factors == 4
        run_stage(name, ctx)
    assert ctx.read_json(paths.TRAINED.meta)["config"]["factors"] == cfg.model.factors == 16
    assert ctx.read_json(paths.METRICS)["k"] == 10
    assert ctx.read_json(paths.RUN_CONFIG) == cfg.model_dump(mode="json")


def test_a_later_stage_without_the_run_snapshot_is_a_clear_error(ctx):
    with pytest.raises(StageError, match=r"stage validate.*no run config snapshot.*run extract"):
        run_stage("validate", ctx)


def test_a_stage_reaches_only_what_it_declares(ctx):
    scoped = ctx.scoped("features", StageIO(reads=(paths.INTERACTIONS,), writes=(paths.USERS,)))
    scoped.write(paths.USERS, b"x")
    assert scoped.read(paths.USERS) == b"x"  # its own output
    with pytest.raises(UndeclaredArtifact, match=r"stage features reads gate/decision.json"):
        scoped.read(paths.DECISION)
    with pytest.raises(UndeclaredArtifact, match=r"stage features writes extract/interactions.parquet"):
        scoped.write(paths.INTERACTIONS, b"y")
    scoped.write_result("features", {"ok": True})  # a stage's own result is always allowed
    assert ctx.read(paths.USERS) == b"x"  # an unscoped context (tests, reports) reads any artifact
