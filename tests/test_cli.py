"""The commands: every `[project.scripts]` entry point and its `launch/` script reach the same `main`."""

from __future__ import annotations

import importlib
import runpy

import pytest
import tomllib
from conftest import ROOT

SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def test_every_command_has_its_launch_script():
    assert set(SCRIPTS) == {"mtmoe-train", "mtmoe-export", "mtmoe-plan", "mtmoe-report", "mtmoe-consolidate"}
    for name, target in SCRIPTS.items():
        module, func = target.split(":")
        main = getattr(importlib.import_module(module), func)
        script = ROOT / "launch" / f"{name.removeprefix('mtmoe-')}.py"
        assert runpy.run_path(str(script), run_name="not_main")["main"] is main, script


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_every_command_answers_help(name, capsys):
    module, func = SCRIPTS[name].split(":")
    with pytest.raises(SystemExit) as stop:
        getattr(importlib.import_module(module), func)(["--help"])
    assert stop.value.code == 0
    assert "usage:" in capsys.readouterr().out
