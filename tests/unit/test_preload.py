"""Preloading the stages' libraries in the processes that fork Airflow tasks (pipeline/preload.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import preload

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("argv", "forks"),
    [
        (["airflow", "scheduler"], True),
        (["airflow", "scheduler", "-n", "3"], True),
        (["airflow", "celery", "worker", "--celery-hostname", "w1"], True),
        (["airflow", "api-server", "--port", "0"], False),
        (["airflow", "dag-processor"], False),
        (["airflow", "celery", "flower"], False),
        (["airflow", "dags", "test", "recsys_demo"], False),
        (["pytest"], False),
    ],
)
def test_only_the_processes_that_fork_tasks_preload(argv, forks):
    assert preload.forks_tasks(argv) is forks


def test_preload_for_imports_the_configured_modules_once(monkeypatch):
    monkeypatch.setenv("RECSYS_PRELOAD", "colorsys, no_such_module_recsys ,")
    sys.modules.pop("colorsys", None)
    took = preload.preload_for(["airflow", "scheduler"])
    assert set(took) == {"colorsys"} and "colorsys" in sys.modules  # the missing one is skipped, not fatal
    assert preload.preload_for(["airflow", "api-server"]) == {}
    monkeypatch.setenv("RECSYS_PRELOAD", "")
    assert preload.preload_for(["airflow", "scheduler"]) == {}


def test_local_settings_preload_in_a_scheduler_process_only():
    """The settings file Airflow imports: in `airflow scheduler`'s argv it imports the modules,
    and it overrides no Airflow setting or policy (an empty __all__)."""
    settings_dir = ROOT / "include" / "airflow" / "config"
    code = (
        "import sys; sys.argv = sys.argv[1:]\n"
        "import airflow_local_settings as s\n"
        "print(s.__all__, 'colorsys' in sys.modules)\n"
    )
    env = {"PYTHONPATH": f"{settings_dir}:{ROOT}", "RECSYS_PRELOAD": "colorsys", "PATH": "/usr/bin:/bin"}
    for argv, expected in ((["airflow", "scheduler"], "True"), (["airflow", "api-server"], "False")):
        out = subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["[]", expected]


def test_compose_preloads_the_default_modules():
    """docker-compose passes RECSYS_PRELOAD explicitly (an unset variable would arrive empty: off)."""
    import yaml

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert compose["x-recsys-env"]["RECSYS_PRELOAD"] == preload.DEFAULT_MODULES
