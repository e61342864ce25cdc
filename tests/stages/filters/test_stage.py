"""The filter stage on the ingested demo run: it finds every planted bad sample, flags nothing
else but the demo's tiny icons, keeps the count invariant; and the ``curate filter`` command."""

from __future__ import annotations

import orjson
import pytest
from typer.testing import CliRunner

from curate.cli.main import app
from curate.core.folder import RunFolder
from curate.stages.filters.config import FilterConfig
from tests.stages.filters.helpers import run_filter

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


def test_cli_smoke(ingested_run, demo_dir, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(ingested_run, run)
    config = tmp_path / "pipeline.yaml"
    # The ingest settings ingested_run was made with: ingest is up to date, filter may run.
    config.write_text(
        f"run: {run}\nmeta: {demo_dir / 'meta.json'}\n"
        "stages:\n  ingest: {shard_lines: 40}\n"
        "  filter:\n    workers: 1\n    rules: {zero_run: {severity: reject}}\n"
    )
    shards = len(RunFolder(run).shards("samples"))
    result = CliRunner().invoke(app, ["filter", "--run", str(run), "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "zero_run" in result.output and "samples per dataset and rule" in result.output
    assert f"filter redone {shards} of {shards} shards" in result.output
    ledger = RunFolder(run).ledger("filter").to_pylist()
    assert {e["severity"] for e in ledger if e["rule"] == "zero_run"} == {"reject"}
    # Same settings again (now from run.json, no --config): nothing is redone.
    again = CliRunner().invoke(app, ["filter", "--run", str(run)])
    assert again.exit_code == 0, again.output
    assert f"filter up to date ({shards} shards)" in again.output
    assert "duplicates up to date (1 runs)" in again.output
    # Worker count changes speed, not results: still nothing to redo.
    workers = CliRunner().invoke(app, ["filter", "--run", str(run), "--set", "workers=2"])
    assert workers.exit_code == 0 and f"filter up to date ({shards} shards)" in workers.output
    # Other settings: every filter shard runs again (the duplicate pass does not), and
    # zero_run is back to flag.
    other = CliRunner().invoke(
        app, ["filter", "--run", str(run), "--set", "rules.zero_run.severity=flag"]
    )
    assert other.exit_code == 0, other.output
    assert f"filter redone {shards} of {shards} shards" in other.output
    assert "duplicates up to date" in other.output
    ledger = RunFolder(run).ledger("filter").to_pylist()
    assert {e["severity"] for e in ledger if e["rule"] == "zero_run"} == {"flag"}


def test_cli_errors(ingested_run, demo_dir, tmp_path):
    # A run folder never ingested, with no pipeline to say what to ingest.
    result = CliRunner().invoke(app, ["filter", "--run", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and result.output.startswith("error:"), result.output
    assert "nothing" in result.output and "curate ingest" in result.output
    assert not (tmp_path / "nothing" / "filter").exists()
    # A pipeline whose ingest is not what the run folder holds: filter refuses to run on it.
    import shutil

    run = tmp_path / "run"
    shutil.copytree(ingested_run, run)
    config = tmp_path / "pipeline.yaml"
    config.write_text(
        f"run: {run}\nmeta: {demo_dir / 'meta.json'}\n"
        "stages:\n  ingest: {shard_lines: 15}\n  filter: {}\n"
    )
    stale = CliRunner().invoke(app, ["filter", "--run", str(run), "--config", str(config)])
    assert stale.exit_code == 2 and "ingest is not up to date" in stale.output, stale.output
    assert not (run / "filter").exists()
    # An override naming no dataset or domain of the run is a typo.
    config.write_text(
        f"run: {run}\nmeta: {demo_dir / 'meta.json'}\nstages:\n  ingest: {{shard_lines: 40}}\n"
        "  filter: {overrides: {no_such_dataset: {zero_run: {threshold: 3}}}}\n"
    )
    typo = CliRunner().invoke(app, ["filter", "--run", str(run), "--config", str(config)])
    assert typo.exit_code == 2 and "unknown datasets/domains" in typo.output, typo.output
