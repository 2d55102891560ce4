"""check-tenant: a new tenant file tried end to end up to validation, writing nothing real."""

from __future__ import annotations

import json

import yaml

from pipeline import cli
from pipeline.config import get_settings
from pipeline.ops.onboarding import check_tenant
from tests.conftest import INTERVAL_END, write_tenant


def _edit(settings, tenant: str, **changes) -> str:
    path = settings.tenants_dir / f"{tenant}.yaml"
    doc = yaml.safe_load(path.read_text())
    for dotted, value in changes.items():
        node = doc
        *parents, last = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def test_a_good_tenant_passes_every_step_and_writes_nothing(settings, small_df):
    write_tenant(settings, "acme", small_df)
    report = check_tenant(settings.tenants_dir / "acme.yaml", INTERVAL_END, settings)
    assert report.ok, report.text()
    assert [s.name for s in report.steps] == ["config", "source", "validation"]
    source = report.steps[1].facts
    assert source["rows"] == len(small_df) and source["users"] == small_df["user_id"].nunique()
    assert "ready to commit" in report.text()
    root = settings.artifact_root
    assert not any(__import__("pathlib").Path(root).rglob("*")), "check-tenant wrote into the real artifact root"


def test_a_config_mistake_names_the_field_and_stops(settings, small_df):
    write_tenant(settings, "acme", small_df)
    path = _edit(settings, "acme", model__factors=-3)
    report = check_tenant(path, INTERVAL_END, settings)
    assert not report.ok and [s.name for s in report.steps] == ["config"]
    assert "model.factors" in report.steps[0].detail and "acme.yaml" in report.steps[0].detail
    assert "not reached: source, validation" in report.text()


def test_an_unreachable_source_and_a_wrong_column_are_named(settings, small_df):
    write_tenant(settings, "acme", small_df)
    missing = _edit(settings, "acme", source__uri=str(settings.data_root / "nowhere" / "events.csv"))
    report = check_tenant(missing, INTERVAL_END, settings)
    assert [(s.name, s.ok) for s in report.steps] == [("config", True), ("source", False)]
    assert "nowhere" in report.steps[1].detail

    write_tenant(settings, "acme", small_df)
    wrong = _edit(settings, "acme", source__columns__item_id="product")
    report = check_tenant(wrong, INTERVAL_END, settings)
    assert not report.steps[-1].ok and "product" in report.steps[-1].detail


def test_data_the_suite_refuses_fails_validation_with_the_check(settings, small_df):
    write_tenant(settings, "acme", small_df, validation={"min_rows": 10 * len(small_df)})
    report = check_tenant(settings.tenants_dir / "acme.yaml", INTERVAL_END, settings)
    assert [(s.name, s.ok) for s in report.steps] == [("config", True), ("source", True), ("validation", False)]
    assert "row" in report.steps[2].detail.lower()


def test_cli_exit_codes_and_json(settings, small_df, monkeypatch, capsys):
    write_tenant(settings, "acme", small_df)
    for name, value in {
        "RECSYS_HOME": settings.home,
        "RECSYS_ARTIFACT_ROOT": settings.artifact_root,
        "RECSYS_TENANTS_DIR": settings.tenants_dir,
        "RECSYS_DATA_ROOT": settings.data_root,
    }.items():
        monkeypatch.setenv(name, str(value))
    get_settings.cache_clear()
    try:
        path = str(settings.tenants_dir / "acme.yaml")
        assert cli.main(["check-tenant", path, "--interval-end", INTERVAL_END.isoformat(), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["ok"] is True
        _edit(settings, "acme", schedule="every night")
        assert cli.main(["check-tenant", path, "--interval-end", INTERVAL_END.isoformat()]) == 2
        assert "schedule" in capsys.readouterr().out
    finally:
        get_settings.cache_clear()
