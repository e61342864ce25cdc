"""Pipeline files: the shipped ones validate; bad ones fail with every problem named."""

from __future__ import annotations

from pathlib import Path

import pytest

from curate.pipeline.config import PipelineError, apply_sets, load_pipeline

ROOT = Path(__file__).resolve().parents[2]  # the repository root


@pytest.mark.parametrize("name", ["demo.yaml", "internvl2_5_1b.yaml"])
def test_shipped_pipelines_parse(name, monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load_pipeline(ROOT / "pipelines" / name, check_paths=name == "demo.yaml")
    assert cfg.stages.ingest is not None and cfg.stages.budget is not None


def test_errors_name_every_problem(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text(
        "run: r\nmeta: nowhere/meta.json\nbogus: 1\nstages:\n  budget:\n"
        "    max_dynamic_patch: many\n    max_tile: 3\n"
    )
    with pytest.raises(PipelineError) as e:
        load_pipeline(p)
    msg = str(e.value)
    assert "bogus: unknown key" in msg
    assert "stages.budget.max_tile: unknown key" in msg
    assert "stages.budget.max_dynamic_patch" in msg


def test_missing_paths(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text(f"run: r\nmeta: {tmp_path}/absent.json\nstages: {{}}\n")
    with pytest.raises(PipelineError, match="missing paths: meta"):
        load_pipeline(p)


def test_not_found_and_not_yaml(tmp_path):
    with pytest.raises(PipelineError, match="not found"):
        load_pipeline(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("run: [unclosed\n")
    with pytest.raises(PipelineError, match="not valid YAML"):
        load_pipeline(tmp_path / "bad.yaml")


def test_set_overrides_apply_under_their_section():
    raw = {"stages": {"filter": {"rules": {"zero_run": {"threshold": 24}}}}}
    apply_sets(
        raw, ["rules.char_run.threshold=120", "rules.zero_run.enabled=false"], "stages.filter"
    )
    assert raw["stages"]["filter"]["rules"] == {
        "zero_run": {"threshold": 24, "enabled": False},
        "char_run": {"threshold": 120},
    }
    with pytest.raises(PipelineError, match="KEY=VALUE"):
        apply_sets({}, ["threshold"])
    with pytest.raises(PipelineError, match="not a section"):
        apply_sets({"stages": {"pack": 3}}, ["stages.pack.max_tokens=1"])
