"""CliRunner smoke tests of the foundation commands."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

from typer.testing import CliRunner

from curate.cli.main import app

runner = CliRunner()


def test_help_is_fast_and_lists_commands():
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import curate.cli.main"],
        capture_output=True,
        text=True,
        check=True,
    )
    heavy = [
        m
        for m in ("torch", "vllm", "ray", "transformers")
        if re.search(rf"\|\s+{m}$", out.stderr, re.MULTILINE)
    ]
    assert heavy == []  # heavy libraries are imported by the commands that need them
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("ingest", "budget", "run", "demo"):
        assert command in result.output


def test_budget_command_end_to_end(demo_dir, tokenizer_dir, tmp_path):
    run = tmp_path / "run"
    args = [
        "budget",
        str(demo_dir / "meta.json"),
        "--run",
        str(run),
        "--tokenizer",
        str(tokenizer_dir),
        "--shard-lines",
        "50",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "budget per dataset" in result.output and "effective" in result.output
    assert "image_too_large" in result.output  # the ingest reasons table
    assert (run / "repeat" / "copies.parquet").exists()
    again = runner.invoke(app, args)
    assert re.search(r"\((\d+) of \1 shards already done\)", " ".join(again.output.split()))


def test_ingest_command_reports_meta_error(tmp_path):
    result = runner.invoke(
        app, ["ingest", str(tmp_path / "nope.json"), "--run", str(tmp_path / "r")]
    )
    assert result.exit_code == 2 and "meta file not found" in result.output


def test_run_command_rejects_bad_pipeline(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("run: r\nmeta: m\nstages:\n  ingest:\n    shards: 3\n")
    result = runner.invoke(app, ["run", str(p)])
    assert result.exit_code == 2
    assert "stages.ingest.shards: unknown key" in result.output


def test_demo_make_is_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        assert runner.invoke(app, ["demo", "make", str(d), "--no-models"]).exit_code == 0
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    shutil.rmtree(b)
