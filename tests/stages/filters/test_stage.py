"""The filter stage on the ingested demo run: it finds every planted bad sample, flags nothing
else but the demo's tiny icons, keeps the count invariant; and the ``curate filter`` command."""

from __future__ import annotations

import orjson
import pytest
from typer.testing import CliRunner

from curate.cli.main import app
from curate.stages.filters.config import FilterConfig
from curate.stages.filters.stage import run_filter
from curate.core.folder import RunFolder

# Planted by curate/demo/data.py `_plant_bad_samples` (those ingest passes on): id -> rules.
PLANTED = {
    "bad:bad_truncated.jpg": {"image_unreadable"},
    "bad:bad_blank.png": {"image_blank"},
    "bad:bad_sliver.jpg": {"image_aspect_ratio"},
    "bad:empty_answer": {"empty_answer"},
    "bad:loop": {"tail_loop", "word_repetition"},
    "bad:image_in_answer": {"image_in_answer"},
    "bad:zeros": {"zero_run"},
    "bad:dup_lines": {"duplicate_lines"},
    "bad:ctrl": {"control_chars", "replacement_char"},
}


def _ids(run: RunFolder) -> dict[str, str]:
    samples = run.read("samples").select(["sample_id", "extra"]).to_pylist()
    return {r["sample_id"]: str(orjson.loads(r["extra"] or "{}").get("id")) for r in samples}


@pytest.fixture(scope="module")
def demo_filtered(ingested_run, tmp_path_factory):
    import shutil

    path = tmp_path_factory.mktemp("filter_demo") / "run"
    shutil.copytree(ingested_run, path)
    run = RunFolder(path)
    return run, run_filter(run, FilterConfig(workers=2))


def test_demo_planted_bad_samples_found(demo_filtered):
    run, _ = demo_filtered
    ids = _ids(run)
    found: dict[str, set[str]] = {}
    for e in run.ledger("filter").to_pylist():
        found.setdefault(ids[e["sample_id"]], set()).add(e["rule"])
    for planted, rules in PLANTED.items():
        assert rules <= found.get(planted, set()), (planted, found.get(planted))
    # Nothing else is caught, except the demo's deliberately tiny icons (24 px < 28 px).
    others = {k: v for k, v in found.items() if k not in PLANTED}
    assert others == {"icon0": {"image_too_small"}}, others


def test_demo_counts(demo_filtered):
    run, summary = demo_filtered
    assert summary.rows_in == run.read("samples").num_rows
    assert summary.rows_in == summary.rows_kept + summary.rows_rejected
    assert run.read("filter").num_rows == summary.rows_kept
    assert summary.rows_rejected == 4  # truncated image, empty answer, <image> in answer, ctrl
    assert summary.by_dataset["general_vqa"][0] == sum(
        1 for r in run.read("samples").column("dataset").to_pylist() if r == "general_vqa"
    )
    stats = run.stats("filter")
    assert stats["rows_flagged"] == summary.rows_flagged > 0


def test_cli_smoke(ingested_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(ingested_run, run)
    config = tmp_path / "pipeline.yaml"
    config.write_text(
        f"run: {run}\nmeta: {tmp_path}/meta.json\ndemo: {{dir: {tmp_path}}}\n"
        "stages:\n  filter:\n    workers: 1\n    rules: {zero_run: {severity: reject}}\n"
    )
    result = CliRunner().invoke(app, ["filter", "--run", str(run), "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "zero_run" in result.output and "samples per dataset and rule" in result.output
    ledger = RunFolder(run).ledger("filter").to_pylist()
    assert {e["severity"] for e in ledger if e["rule"] == "zero_run"} == {"reject"}
    again = CliRunner().invoke(app, ["filter", "--run", str(run), "--config", str(config)])
    assert again.exit_code == 0 and "(10 of 10" in again.output
    # Other settings (here the defaults): the stage runs again, zero_run back to flag.
    other = CliRunner().invoke(app, ["filter", "--run", str(run), "--workers", "1"])
    assert other.exit_code == 0 and "(0 of 10" in other.output
    ledger = RunFolder(run).ledger("filter").to_pylist()
    assert {e["severity"] for e in ledger if e["rule"] == "zero_run"} == {"flag"}


def test_cli_errors(tmp_path):
    result = CliRunner().invoke(app, ["filter", "--run", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "no samples/" in result.output
