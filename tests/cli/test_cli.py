"""Every ``curate`` command through Typer's CliRunner: what it does to a run folder, what it
prints, and how it refuses (exit status 2, one ``error:`` line, no traceback) a missing or
stale earlier stage, a bad ``--set`` or config key, and a run folder another process holds.

The stage commands build one run folder in order (``built``: ingest, budget, filter, pack,
report); tests that change it work on a copy. Score and train run a vLLM judge and a model on
the CPU: they are marked slow.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import yaml
from typer.testing import CliRunner

from curate.cli.main import app
from curate.core.folder import RunFolder

runner = CliRunner()
COMMANDS = (
    "ingest",
    "budget",
    "filter",
    "score",
    "review",
    "pack",
    "train",
    "report",
    "export",
    "status",
    "run",
    "demo",
)
# The demo judge on the CPU (as in pipelines/demo.yaml): exact float32, a small KV cache.
JUDGE_SETS = [
    "--set",
    "dtype=float32",
    "--set",
    "max_model_len=2048",
    "--set",
    "kv_cache_memory_bytes=67108864",
]


def invoke(*args: str | Path):
    """Run a command; returns the result and its output with whitespace runs collapsed."""
    result = runner.invoke(app, [str(a) for a in args])
    return result, " ".join(result.output.split())


def assert_one_error_line(output: str, *fragments: str) -> None:
    """No traceback and exactly one ``error:`` line, holding every fragment (progress lines or
    a library's log lines may come before it)."""
    assert "Traceback" not in output, output
    (line,) = [x for x in output.splitlines() if x.startswith("error:")]
    for fragment in fragments:
        assert fragment in line, (fragment, output)


def assert_ok(result) -> None:
    assert result.exit_code == 0, result.output
    assert "error:" not in result.output


def assert_user_error(result, *fragments: str) -> str:
    """Exit status 2 and one ``error:`` line (the first) holding every fragment."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    lines = result.output.splitlines()
    assert lines and lines[0].startswith("error: "), result.output
    assert sum(line.startswith("error:") for line in lines) == 1, result.output
    text = " ".join(result.output.split())
    for fragment in fragments:
        assert fragment in text, (fragment, result.output)
    return text


def status_rows(output: str) -> dict[str, list[str]]:
    """The cells of each stage's row in a ``curate status`` / ``run --dry-run`` table."""
    rows = {}
    for line in output.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃]", line)[1:-1]]
        if cells and cells[0] and cells[0] != "stage":
            rows[cells[0]] = cells[1:]
    return rows


def recorded_pipeline(run: Path) -> dict:
    """The pipeline the run's last command ran with (run.json)."""
    return orjson.loads((run / "run.json").read_bytes())["pipeline"]


def write_pipeline(path: Path, pipeline: dict) -> Path:
    path.write_text(yaml.safe_dump(pipeline))
    return path


def files_of(run: Path) -> dict[str, bytes]:
    """Every file of a run folder and its bytes (the lock file left out: it names its holder)."""
    return {
        str(p.relative_to(run)): p.read_bytes()
        for p in sorted(run.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


@pytest.fixture(scope="module")
def built(demo_dir, tokenizer_dir, tmp_path_factory):
    """A run folder made by the stage commands in order; each command's output by name.

    Read-only: tests that change it copy it first (``copy_of``)."""
    root = tmp_path_factory.mktemp("cli")
    run = root / "run"
    outputs = {}
    meta = demo_dir / "meta.json"
    for name, args in (
        ("ingest", ["ingest", meta, "--run", run, "--set", "shard_lines=40"]),
        ("budget", ["budget", "--run", run, "--tokenizer", tokenizer_dir]),
        ("filter", ["filter", "--run", run]),
        ("pack", ["pack", "--run", run, "--set", "max_tokens=8192", "--set", "max_tiles=40"]),
        ("report", ["report", "--run", run]),
    ):
        result, outputs[name] = invoke(*args)
        assert_ok(result)
    return run, outputs


@pytest.fixture
def copy_of(built, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(built[0], run)
    return run


# -- help ------------------------------------------------------------------------------------
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
    result, text = invoke("--help")
    assert result.exit_code == 0
    for command in COMMANDS:
        assert re.search(rf"│ {command}\s", result.output), command
    # a stage command lists its section's settings, from the config model
    result, text = invoke("filter", "--help")
    assert result.exit_code == 0
    assert "stages.filter" in text and "decode_images" in text and "--set" in text


# -- the stage commands, in order --------------------------------------------------------------
def test_ingest_command(demo_dir, tmp_path):
    run = tmp_path / "run"
    args = ["ingest", demo_dir / "meta.json", "--run", run, "--set", "shard_lines=40"]
    result, text = invoke(*args)
    assert_ok(result)
    assert "ingest redone 10 of 10 shards" in text
    assert "image_too_large" in text  # the ingest reasons table
    assert RunFolder(run).shards("samples")
    recorded = recorded_pipeline(run)
    assert recorded["meta"] == str(demo_dir / "meta.json")
    assert recorded["stages"]["ingest"]["shard_lines"] == 40
    result, text = invoke(*args)
    assert_ok(result)
    assert "ingest up to date (10 shards)" in text


def test_ingest_command_reports_meta_error(tmp_path):
    result, text = invoke("ingest", tmp_path / "nope.json", "--run", tmp_path / "r")
    assert_user_error(result, "missing paths: meta:", "nope.json")
    assert not (tmp_path / "r" / "samples").exists()


def test_stage_commands_build_a_run(built):
    run, out = built
    assert "ingest redone 10 of 10 shards" in out["ingest"]
    assert "image_too_large" in out["ingest"]  # the ingest reasons table
    assert "budget redone 10 of 10 shards" in out["budget"]
    assert "budget per dataset" in out["budget"] and "effective" in out["budget"]
    assert (run / "repeat" / "copies.parquet").exists()
    assert (run / "repeat" / "budget_table.json").exists()
    assert "filter: samples per dataset and rule" in out["filter"]
    assert re.search(
        r"filter images: [\d,]+ looked up per shard, [\d.]+% from the run's cache", out["filter"]
    )
    assert RunFolder(run).shards("filter") == RunFolder(run).shards("samples")
    assert "pack (curate)" in out["pack"] and "token fill" in out["pack"]
    assert RunFolder(run).shards("packs")
    assert "gallery rules" in out["report"]
    assert f"report: {(run / 'report.html').resolve()}" in out["report"]
    # each command added its section to the pipeline the run records
    recorded = recorded_pipeline(run)
    assert recorded["stages"]["pack"]["max_tokens"] == 8192
    assert recorded["models"]["tokenizer"] is not None
    assert {k for k, v in recorded["stages"].items() if v is not None} == {
        "ingest",
        "budget",
        "filter",
        "pack",
        "report",
    }


def test_a_command_again_redoes_nothing(built, copy_of, tokenizer_dir):
    before = files_of(copy_of)
    pipeline = recorded_pipeline(copy_of)
    result, text = invoke("budget", "--run", copy_of)
    assert_ok(result)
    assert "budget up to date (10 shards)" in text and "repeat up to date (1 runs)" in text
    result, text = invoke("filter", "--run", copy_of)
    assert_ok(result)
    assert "filter up to date (10 shards)" in text
    after = files_of(copy_of)
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    stats = {f"stats/{s}.json" for s in ("budget", "repeat", "duplicates", "filter")}
    assert changed <= stats | {"run.json"}  # totals (their timings), and the run path:
    assert recorded_pipeline(copy_of) == {**pipeline, "run": str(copy_of)}


def test_set_changes_a_setting_and_redoes_the_stage(copy_of):
    flags = RunFolder(copy_of).stats("filter")["by_rule"]
    assert flags["flag:zero_run"] == 1  # a run of 120 zeros (threshold 32)
    result, text = invoke("filter", "--run", copy_of, "--set", "rules.zero_run.threshold=200")
    assert_ok(result)
    assert "filter redone 10 of 10 shards" in text
    assert "flag:zero_run" not in RunFolder(copy_of).stats("filter")["by_rule"]
    recorded = recorded_pipeline(copy_of)["stages"]["filter"]["rules"]
    assert recorded["zero_run"]["threshold"] == 200
    result, text = invoke("status", copy_of)
    assert_ok(result)
    rows = status_rows(result.output)
    assert rows["filter"][0] == "done"
    # pack respects the filter: it is stale now, and says why
    assert rows["pack"][0] == "stale" and "input changed: filter" in rows["pack"][2]


def test_status_shows_a_stale_stage_and_why(built, copy_of, tmp_path):
    result, _ = invoke("status", built[0])
    assert_ok(result)
    rows = status_rows(result.output)
    assert list(rows) == [
        "ingest",
        "budget",
        "repeat",
        "duplicates",
        "filter",
        "tokenize",
        "pack",
        "report",
    ]
    assert {r[0] for r in rows.values()} == {"done"}
    # in, kept, rejected from its stats: the demo's 214 lines plus the 19 lines planted for
    # near-duplicates and benchmark leaks (curate/demo/data.py `_plant_near_duplicates`)
    assert rows["ingest"][3:] == ["233", "223", "10"]
    # a filter threshold changed in a pipeline file: filter is stale, the reason is given,
    # and what reads it waits for it
    pipeline = recorded_pipeline(copy_of)
    pipeline["stages"]["filter"]["rules"] = {"zero_run": {"threshold": 200}}
    changed = write_pipeline(tmp_path / "changed.yaml", pipeline)
    before = files_of(copy_of)
    result, _ = invoke("status", copy_of, "--config", changed)
    assert_ok(result)
    rows = status_rows(result.output)
    assert rows["filter"][:3] == ["stale", "10/10", "settings changed"]
    assert rows["budget"][0] == "done" and rows["tokenize"][0] == "done"
    for later in ("pack", "report"):
        assert rows[later][0] == "after filter", rows[later]
    assert files_of(copy_of) == before  # status changes nothing
    # a later stage's command refuses to run on the stale filter
    result, _ = invoke("pack", "--run", copy_of, "--config", changed)
    assert_user_error(result, "filter is not up to date", "settings changed")
    assert files_of(copy_of) == before


def test_review_decisions_make_pack_stale(copy_of):
    result, text = invoke("review", "--run", copy_of, "--pending")
    assert_ok(result)
    match = re.search(r"flagged samples awaiting review \((\d+)\)", text)
    assert match and int(match.group(1)) > 0
    sample = re.search(r"│ ([0-9a-f]{16}) │", result.output).group(1)
    result, text = invoke("review", "--run", copy_of, "--sample", sample, "--keep")
    assert_ok(result)
    assert f"recorded: keep {sample}" in text
    result, text = invoke("review", "--run", copy_of, "--list")
    assert "review decisions in force (1)" in text and sample in text
    result, _ = invoke("status", copy_of)
    rows = status_rows(result.output)
    assert rows["filter"][0] == "done"  # a decision changes no stage's ledger
    assert rows["pack"][0] == "stale" and "input changed: review" in rows["pack"][2]
    result, text = invoke("pack", "--run", copy_of)
    assert_ok(result)
    assert "pack redone 1 of 1 runs" in text
    packed = {s for p in RunFolder(copy_of).read("packs").to_pylist() for s in p["sample_ids"]}
    assert sample in packed  # flagged, kept by review: packed now


def test_export_writes_the_kept_samples(built, tmp_path):
    run = built[0]
    before = files_of(run)
    out = tmp_path / "export"
    result, text = invoke("export", "--run", run, "--out", out)
    assert_ok(result)
    assert f"exported to {out / 'meta.json'}" in text
    meta = orjson.loads((out / "meta.json").read_bytes())
    assert set(meta) == set(RunFolder(run).datasets())
    lines = sum(meta[d]["length"] for d in meta)
    packed = RunFolder(run).stats("pack")["report"]
    assert lines == packed["samples_packed"] > 0  # kept and drawn: what pack packed
    assert files_of(run) == before  # export reads the run, never writes it
    bad = runner.invoke(app, ["export", "--run", str(run), "--out", str(out), "--format", "x"])
    assert_user_error(bad, "unknown format 'x'")


def test_run_dry_run_says_what_it_would_redo_and_stops(built, copy_of, tmp_path):
    pipeline = recorded_pipeline(copy_of)
    pipeline["run"] = str(copy_of)
    same = write_pipeline(tmp_path / "same.yaml", pipeline)
    before = files_of(copy_of)
    result, _ = invoke("run", same, "--dry-run")
    assert_ok(result)
    assert "what this run redoes" in result.output
    rows = status_rows(result.output)
    assert set(rows) >= {"ingest", "filter", "pack", "report"}
    assert {r[0] for r in rows.values()} == {"done"}
    pipeline["stages"]["pack"]["max_tokens"] = 4096
    changed = write_pipeline(tmp_path / "changed.yaml", pipeline)
    result, _ = invoke("run", changed, "--dry-run")
    assert_ok(result)
    rows = status_rows(result.output)
    assert rows["pack"][:3] == ["stale", "1/1", "settings changed"]
    assert rows["report"][0] == "after pack" and rows["filter"][0] == "done"
    assert files_of(copy_of) == before  # a dry run changes nothing
    # without --dry-run it redoes exactly that
    result, text = invoke("run", changed)
    assert_ok(result)
    assert "pack redone 1 of 1 runs" in text and "filter up to date" in text
    assert "tokenize up to date" in text


def test_demo_make_is_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        assert runner.invoke(app, ["demo", "make", str(d), "--no-models"]).exit_code == 0
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    shutil.rmtree(b)


# -- foreseeable errors: exit 2, one line ------------------------------------------------------
def test_a_missing_earlier_stage_is_refused(built, demo_dir, tmp_path):
    empty = tmp_path / "empty"
    for args in (
        ["budget", "--run", empty],
        ["filter", "--run", empty],
        ["pack", "--run", empty],
        ["report", "--run", empty],
    ):
        assert_user_error(runner.invoke(app, [str(a) for a in args]), "not a run folder")
    result, _ = invoke("status", empty)
    assert_user_error(result, "is not a run folder")
    result, _ = invoke("export", "--run", empty, "--out", tmp_path / "x")
    assert_user_error(result, "has no samples/")
    result, _ = invoke("review", "--run", empty, "--pending")
    assert_user_error(result, "has no samples/")
    # an ingested run whose pipeline has a budget that never ran: pack waits for it
    run = tmp_path / "ingested"
    pipeline = recorded_pipeline(built[0])
    pipeline.update(run=str(run), stages={"ingest": pipeline["stages"]["ingest"]})
    assert_ok(invoke("run", write_pipeline(tmp_path / "ingest.yaml", pipeline))[0])
    pipeline["stages"].update(budget={}, pack={})
    full = write_pipeline(tmp_path / "full.yaml", pipeline)
    result, _ = invoke("pack", "--run", run, "--config", full)
    assert_user_error(result, "budget is not up to date", "not done yet")
    assert not (run / "packs").exists()
    # a pipeline without a budget has no grids to pack
    result, _ = invoke("pack", "--run", run)
    assert_user_error(result, "stages.budget", "is not set")
    # no judge named for score
    result, _ = invoke("score", "--run", run)
    assert_user_error(result, "score.model or models.judge is not set")


def test_train_without_pack_is_refused(built, copy_of):
    # the built run has packs, but its pipeline (--config) has no pack section
    pipeline = recorded_pipeline(copy_of)
    pipeline["stages"]["pack"] = None
    no_pack = write_pipeline(copy_of.parent / "no_pack.yaml", pipeline)
    result, _ = invoke("train", "--run", copy_of, "--config", no_pack, "--set", "steps=1")
    assert_user_error(result, "pack")
    assert not (copy_of / "train").exists()


def test_bad_set_and_config_keys_are_refused(built, copy_of, tmp_path):
    before = files_of(copy_of)
    result, _ = invoke("filter", "--run", copy_of, "--set", "bogus=3")
    assert_user_error(result, "invalid pipeline file", "stages.filter.bogus: unknown key")
    result, _ = invoke("filter", "--run", copy_of, "--set", "rules.nope.threshold=3")
    assert_user_error(result, "unknown rule(s) ['nope']")  # brackets kept, not read as markup
    result, _ = invoke("pack", "--run", copy_of, "--set", "max_tokens")
    assert_user_error(result, "--set wants KEY=VALUE, got 'max_tokens'")
    result, _ = invoke("pack", "--run", copy_of, "--set", "max_tokens=[1")
    assert_user_error(result, "value is not valid YAML")
    pipeline = recorded_pipeline(copy_of)
    pipeline["stages"]["filter"]["thresholds"] = {"char_run": 3}
    bad = write_pipeline(tmp_path / "bad.yaml", pipeline)
    for args in (
        ["filter", "--run", copy_of, "--config", bad],
        ["status", copy_of, "--config", bad],
    ):
        result, _ = invoke(*args)
        assert_user_error(result, "stages.filter.thresholds: unknown key")
    result, _ = invoke("run", bad)
    assert_user_error(result, "stages.filter.thresholds: unknown key")
    result, _ = invoke("filter", "--run", copy_of, "--config", tmp_path / "none.yaml")
    assert_user_error(result, "pipeline file not found")
    assert files_of(copy_of) == before


def test_run_command_rejects_bad_pipeline(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("run: r\nmeta: m\nstages:\n  ingest:\n    shards: 3\n")
    result, _ = invoke("run", p)
    assert_user_error(result, "stages.ingest.shards: unknown key")


def test_a_locked_run_is_refused_with_the_holder(built, copy_of, demo_dir, tmp_path):
    """Every command that works on a run folder holds its lock: while another process holds
    it, each refuses, names the holder's pid, and writes nothing."""
    pipeline = recorded_pipeline(copy_of)
    pipeline["run"] = str(copy_of)
    same = write_pipeline(tmp_path / "same.yaml", pipeline)
    sample = RunFolder(copy_of).read("samples", columns=["sample_id"])["sample_id"][0].as_py()
    before = files_of(copy_of)
    out = tmp_path / "export"
    commands = [
        ["report", "--run", copy_of],
        ["export", "--run", copy_of, "--out", out],
        ["ingest", demo_dir / "meta.json", "--run", copy_of],
        ["budget", "--run", copy_of],
        ["filter", "--run", copy_of],
        ["score", "--run", copy_of],
        ["pack", "--run", copy_of],
        ["train", "--run", copy_of],
        ["review", "--run", copy_of, "--sample", sample, "--reject"],
        ["run", same],
        ["status", copy_of],
    ]
    # the lock is per open file: this process holding it is "another process" to a command
    with RunFolder(copy_of).lock():
        for args in commands:
            result, _ = invoke(*args)
            assert_user_error(result, "is in use by another curate process", f"(pid {os.getpid()}:")
    assert not out.exists()
    assert files_of(copy_of) == before
    # released: the same commands work
    result, text = invoke("report", "--run", copy_of)
    assert_ok(result)
    assert "report up to date" in text
    assert_ok(invoke("export", "--run", copy_of, "--out", out)[0])


# -- score and train (a vLLM judge, a model on the CPU) ----------------------------------------
@pytest.mark.slow
def test_score_command(copy_of, demo_models):
    result, text = invoke("score", "--run", copy_of, "--judge", demo_models["judge"], *JUDGE_SETS)
    assert_ok(result)
    assert "score redone 10 of 10 shards" in text
    assert "score: quality scores per domain" in text
    run = RunFolder(copy_of)
    assert run.shards("scores") == run.shards("samples")
    scores = run.read("scores").to_pylist()
    assert scores and all(r["quality_score"] in range(11) for r in scores)
    # pack now requires score: it is stale, and redone by its command
    result, _ = invoke("status", copy_of)
    rows = status_rows(result.output)
    assert rows["score"][0] == "done"
    assert rows["pack"][0] == "stale" and "score" in rows["pack"][2]
    result, text = invoke("pack", "--run", copy_of)
    assert_ok(result)
    assert "pack redone 1 of 1 runs" in text
    # the judge is not loaded again for what is done
    result, text = invoke("score", "--run", copy_of)
    assert_ok(result)
    assert "score up to date (10 shards)" in text


@pytest.mark.slow
@pytest.mark.parametrize(
    ("setting", "says"),
    [
        ("max_model_len=100000", "is greater than the derived max_model_len"),
        ("kv_cache_memory_bytes=1000000000000", "less than requested memory for kv"),
        ("engine_kwargs.no_such_argument=1", "unexpected keyword argument 'no_such_argument'"),
    ],
)
def test_score_settings_vllm_refuses_are_one_line(copy_of, demo_models, setting, says):
    """What vLLM refuses at start (a length above the judge's, a KV cache that does not fit,
    an argument it does not know) is one line naming the judge, not a traceback."""
    import subprocess
    import sys

    judge = demo_models["judge"]
    args = ["score", "--run", copy_of, "--judge", judge, *JUDGE_SETS, "--set", setting]
    # A process of its own, as a user runs it: vLLM's log handlers outlive a CliRunner call.
    done = subprocess.run(
        [sys.executable, "-m", "curate.cli.main", *map(str, args)], capture_output=True, text=True
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert_one_error_line(done.stdout + done.stderr, f"the judge {judge} cannot start", says)


@pytest.mark.parametrize(
    ("setting", "says"),
    [
        ("model=/no/such/model", "train.model: no such directory /no/such/model"),
        ("tokenizer=/no/such/tok", "train.tokenizer: no such directory /no/such/tok"),
    ],
)
def test_train_model_that_is_not_there_is_one_line(copy_of, setting, says):
    result, _ = invoke("train", "--run", copy_of, "--set", "steps=1", "--set", setting)
    assert result.exit_code == 2
    assert_one_error_line(result.output, says)


def test_train_model_folder_without_a_model_is_one_line(copy_of, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result, _ = invoke("train", "--run", copy_of, "--set", "steps=1", "--set", f"model={empty}")
    assert result.exit_code == 2
    assert_one_error_line(result.output, "cannot load the model or tokenizer to train")


@pytest.mark.slow
def test_train_command(copy_of):
    args = ["train", "--run", copy_of, "--set", "steps=2", "--set", "flavor=debug"]
    result, text = invoke(*args, "--set", "workers=1")
    assert_ok(result)
    assert "train: 2 optimizer steps" in text and "checkpoint:" in text
    assert (copy_of / "train" / "metrics.jsonl").exists()
    result, text = invoke(*args, "--set", "workers=1")
    assert_ok(result)
    assert "train up to date (1 runs)" in text
    result, _ = invoke("status", copy_of)
    rows = status_rows(result.output)
    assert rows["train"][0] == "done" and rows["report"][0] == "stale"
