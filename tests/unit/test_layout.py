"""The architecture, enforced: stages talk only through declared artifacts, serving runs no stage,
and no module grows past what one reason to change needs.

Like the Airflow-import test (tests/dags/test_dagbag.py), these read the source, so a rule
is broken in the commit that breaks it, not discovered in a run far away.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from pipeline import stages
from pipeline.storage import paths

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "pipeline"
STAGE_MODULES = set(stages.STAGE_MODULES.values())


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imported(path: Path) -> set[str]:
    """Every pipeline module `path` imports, at the top or inside functions."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}  # `from pipeline.x import module`
    return {m for m in out if m.startswith("pipeline.")}


SOURCES = sorted(PKG.rglob("*.py"))


@pytest.mark.parametrize("path", [p for p in SOURCES if module_name(p) in STAGE_MODULES], ids=module_name)
def test_no_stage_module_imports_another(path):
    me = module_name(path)
    others = sorted(imported(path) & (STAGE_MODULES - {me}))
    assert not others, f"{me} imports stage module(s) {others}: read their declared artifacts instead"


@pytest.mark.parametrize("path", sorted((PKG / "serving").rglob("*.py")), ids=module_name)
def test_serving_imports_no_stage(path):
    bad = sorted(imported(path) & STAGE_MODULES)
    assert not bad, f"{module_name(path)} imports stage module(s) {bad}: serving must not run pipeline stages"


def test_the_rule_sees_lazy_and_package_imports(tmp_path):
    """The checker itself: a stage reaching another inside a function, or via its package, is caught."""
    f = tmp_path / "probe.py"
    f.write_text("def f():\n    from pipeline.training import train\n    import pipeline.index.build\n")
    assert {"pipeline.training.train", "pipeline.index.build"} <= imported(f)


def test_every_stage_declares_its_io():
    for name in stages.STAGES:
        fn, io = stages.stage(name)
        assert callable(fn) and io.writes, f"stage {name} declares no outputs"
        assert all(isinstance(a, paths.Artifact) for a in (*io.reads, *io.writes))


def test_dataflow_is_closed_and_ordered():
    """Each stage reads only what an earlier stage wrote; each artifact has one writer."""
    written: dict[paths.Artifact, str] = {paths.RUN_CONFIG: "the run's start"}
    for name in stages.STAGES:
        _, io = stages.stage(name)
        missing = [str(a) for a in io.reads if a not in written]
        assert not missing, f"stage {name} reads {missing}, which no earlier stage writes"
        for a in io.writes:
            assert a not in written, f"{a} is written by both {written[a]} and {name}"
            assert a.stage == name, f"stage {name} writes {a} under another stage's folder"
            written[a] = name


def test_modules_stay_small():
    big = {module_name(p): n for p in SOURCES if (n := len(p.read_text().splitlines())) > 400}
    dags = {p.name: n for p in (ROOT / "dags").glob("*.py") if (n := len(p.read_text().splitlines())) > 150}
    assert not big and not dags, f"over the size limit (modules 400 lines, DAG files 150): {big | dags}"
