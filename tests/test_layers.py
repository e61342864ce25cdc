"""The file tree reads as the pipeline, and the layering holds: ``lint-imports`` (the
contracts in pyproject.toml) must pass — cli -> pipeline -> stages -> core, stages independent
but for named one-way uses, stages never importing the engine, an executor or the CLI, and no
import cycles (imports inside functions count: grimp reads every import statement)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert lint, "import-linter is a dev dependency (make setup installs it)"
    result = subprocess.run([lint], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_contracts_catch_a_stage_importing_the_cli(tmp_path):
    """The contracts can fail: a copy of the package with one forbidden import breaks them."""
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "curate", copy / "curate")
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    tiling = copy / "curate" / "stages" / "budget" / "tiling.py"
    tiling.write_text(tiling.read_text() + "\nfrom curate.cli import console  # noqa\n")
    env = {"PYTHONPATH": str(copy), "PATH": str(Path(sys.executable).parent)}
    result = subprocess.run([lint], cwd=copy, capture_output=True, text=True, env=env)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout
