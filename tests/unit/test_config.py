from pathlib import Path

import pytest

from pipeline.config import TenantConfigError, is_valid_tenant_id, load_tenant, load_tenant_file

MINIMAL = """\
tenant: acme
source:
  uri: data/acme/interactions.csv
  columns: {user_id: uid, item_id: iid, timestamp: when}
"""


def _write(tmp_path: Path, text: str, name: str = "acme.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_minimal_file_gets_good_defaults(tmp_path):
    cfg = load_tenant_file(_write(tmp_path, MINIMAL))
    assert cfg.tenant == "acme"
    assert cfg.source.columns.user_id == "uid" and cfg.source.columns.rating is None
    assert cfg.model.kind == "als" and cfg.model.factors >= 32
    assert cfg.features.holdout_fraction == 0.2
    assert cfg.evaluation.k == 10


@pytest.mark.parametrize(
    ("text", "field", "reason"),
    [
        (MINIMAL.replace("tenant: acme", "tenant: Acme_Corp"), "tenant", "should match pattern"),
        (MINIMAL + "model: {factors: 0}\n", "model.factors", "greater than or equal to 1"),
        (MINIMAL + "model: {kind: svd}\n", "model", "'svd'"),
        (MINIMAL + "gate: {tolerence: 0.1}\n", "gate.tolerence", "Extra inputs are not permitted"),
        ("tenant: acme\n", "source", "Field required"),
        (MINIMAL + "schedule: every night\n", "schedule", "cron"),
    ],
)
def test_errors_name_file_field_and_reason(tmp_path, text, field, reason):
    path = _write(tmp_path, text)
    with pytest.raises(TenantConfigError) as err:
        load_tenant_file(path)
    message = str(err.value)
    assert str(path) in message
    assert f"'{field}" in message
    assert reason in message


def test_invalid_yaml_and_non_mapping(tmp_path):
    with pytest.raises(TenantConfigError, match="not valid YAML"):
        load_tenant_file(_write(tmp_path, "tenant: [unclosed"))
    with pytest.raises(TenantConfigError, match="expected a mapping"):
        load_tenant_file(_write(tmp_path, "- a\n- b\n"))


def test_file_name_must_match_tenant_in_tenants_dir(tmp_path):
    _write(tmp_path, MINIMAL, name="other.yaml")
    with pytest.raises(TenantConfigError, match="does not match the file name"):
        load_tenant("other", tmp_path)


@pytest.mark.parametrize("bad", ["", "A", "-a", "a" * 41, "a/b", "../x", "a:b", "é", "a*"])
def test_tenant_id_rules(bad):
    assert not is_valid_tenant_id(bad)
    assert is_valid_tenant_id("acme-2")


def test_load_tenant_rejects_bad_id_before_touching_disk(tmp_path):
    with pytest.raises(TenantConfigError, match="invalid"):
        load_tenant("../etc/passwd", tmp_path)


def test_tenants_choose_and_search_the_item_item_kinds(tmp_path):
    text = MINIMAL + (
        "model: {kind: ease, regularization: 50, neighbours: 100}\n"
        "selection:\n"
        "  candidates:\n"
        "    - {kind: item_knn, search: {neighbours: {low: 10, high: 200, int: true}, shrinkage: [0, 5]}}\n"
        "    - {kind: ease, search: {regularization: {low: 10, high: 1000, log: true}}}\n"
    )
    cfg = load_tenant_file(_write(tmp_path, text))
    assert cfg.model.kind == "ease" and cfg.model.neighbours == 100 and cfg.model_kinds() == ["ease", "item_knn"]
    assert cfg.training.queue_for(*cfg.model_kinds()) == "cpu"
    with pytest.raises(TenantConfigError, match="unknown parameter"):
        load_tenant_file(_write(tmp_path, MINIMAL + "model: {kind: item_knn, search: {factors: [8, 16]}}\n"))


def test_the_model_config_union_lists_every_kind():
    """ModelConfig is spelled out for type checkers; it must name exactly MODEL_CONFIGS, tag = kind."""
    import typing

    from pydantic import Tag

    from pipeline.config.models import MODEL_CONFIGS, ModelConfig

    members = typing.get_args(typing.get_args(ModelConfig)[0])
    tagged = {typing.get_args(m)[0]: next(a.tag for a in typing.get_args(m)[1:] if isinstance(a, Tag)) for m in members}
    assert tagged == {c: c.model_fields["kind"].default for c in MODEL_CONFIGS}
