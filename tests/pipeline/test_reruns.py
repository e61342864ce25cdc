"""Users iterate: they fix a line, change a threshold or a cap, drop a dataset, and rerun.

Each test runs the demo pipeline through ``curate run`` (the judge through vLLM on the CPU),
changes one input or setting, reruns, and checks that exactly what the change invalidates was
redone (the engine's own ``redone`` list in ``stats/<stage>.json``), and that no stage serves
stale data.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import orjson
import polars as pl
import pytest
import yaml
from typer.testing import CliRunner

from curate.cli.main import app
from curate.core.folder import RunFolder
from curate.core.io import read_json
from curate.core.records import sample_id

pytestmark = pytest.mark.slow

STAGES = {
    "ingest": {"shard_lines": 40},
    "budget": {"max_dynamic_patch": 12},
    "filter": {"decode_images": True, "rules": {"zero_run": {"threshold": 24}}},
    "score": {
        "engine": "vllm",
        "dtype": "float32",
        "max_model_len": 2048,
        "kv_cache_memory_bytes": 67108864,
        "quality_threshold": 0,  # the tiny judge's scores are noise: keep what it scores
        "batch_size": 256,
    },
    "pack": {"max_tokens": 8192, "max_tiles": 40},
    "report": {},
}


@pytest.fixture
def workspace(tmp_path, demo_dir, demo_models) -> dict:
    """A private copy of the demo mixture (tests edit it) and a pipeline file over it."""
    data = tmp_path / "data"
    shutil.copytree(demo_dir, data, ignore=shutil.ignore_patterns("models"))
    # The meta's paths are relative to its folder: the copy reads the copied files.
    return {
        "data": data,
        "meta": data / "meta.json",
        "run": tmp_path / "run",
        "tmp": tmp_path,
        "models": demo_models,
    }


def write_pipeline(ws: dict, **changes: dict) -> Path:
    stages = {name: dict(cfg) for name, cfg in STAGES.items()}
    for name, cfg in changes.items():
        stages[name] = cfg if cfg is None else {**stages.get(name, {}), **cfg}
    pipeline = {
        "run": str(ws["run"]),
        "meta": str(ws["meta"]),
        "models": {
            "tokenizer": str(ws["models"]["tokenizer"]),
            "judge": str(ws["models"]["judge"]),
        },
        "stages": {k: v for k, v in stages.items() if v is not None},
    }
    path = ws["tmp"] / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline))
    return path


def curate_run(path: Path) -> None:
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 0, result.output + repr(result.exception)


def redone(run: Path) -> dict[str, list[str]]:
    """What the last run redid, per stage (from the engine's stats)."""
    return {p.stem: read_json(p)["redone"] for p in sorted((run / "stats").glob("*.json"))}


def table(run: Path, name: str) -> pl.DataFrame:
    return pl.from_arrow(RunFolder(run).read(name))


def ids(run: Path, name: str) -> set[str]:
    return set(table(run, name)["sample_id"].to_list())


def packed_ids(run: Path) -> set[str]:
    packs = table(run, "packs")
    return set(packs["sample_ids"].explode().to_list())


def test_noop_rerun_redoes_nothing(workspace):
    path = write_pipeline(workspace, train={"flavor": "debug", "steps": 1, "workers": 0})
    curate_run(path)
    curate_run(path)
    assert redone(workspace["run"]) == {name: [] for name in redone(workspace["run"])}
    assert set(redone(workspace["run"])) >= {"ingest", "filter", "score", "pack", "train"}


def test_fixed_line_reaches_every_stage(workspace):
    """A malformed JSONL line, fixed as `curate review` tells users to, is ingested, budgeted,
    filtered, scored and packed on the next run; only its shard is redone upstream of pack."""
    path = write_pipeline(workspace)
    curate_run(path)
    run = workspace["run"]
    annotation = workspace["data"] / "annotations" / "math_text.jsonl"
    lines = annotation.read_bytes().split(b"\n")
    bad = pl.from_arrow(RunFolder(run).ledger("ingest")).filter(pl.col("rule") == "malformed_json")
    line_no = bad.filter(pl.col("dataset") == "math_text")["line"][0]
    fixed = orjson.dumps(
        {
            "conversations": [
                {"from": "human", "value": "What is the sum of the first four odd numbers?"},
                {"from": "gpt", "value": "1 + 3 + 5 + 7 = 16, which is 4 squared."},
            ]
        }
    )
    lines[line_no - 1] = fixed
    annotation.write_bytes(b"\n".join(lines))
    new_id = sample_id("math_text", fixed)

    curate_run(path)
    for name in ("samples", "budget", "filter", "scores", "tokens"):
        assert new_id in ids(run, name), name
    # Kept by pack; packed unless its dataset's repeat factor < 1 draws only earlier lines.
    assert new_id in ids(run, "pack")
    assert (new_id in packed_ids(run)) == (new_id not in _not_drawn(run))
    shard = f"math_text-{(line_no - 1) // 40:05d}"
    again = redone(run)
    for stage in ("ingest", "budget", "filter", "score", "tokenize"):
        assert again[stage] == [shard], stage
    assert again["pack"] == ["all"]
    assert "malformed_json" not in set(pl.from_arrow(RunFolder(run).ledger("ingest"))["rule"])


def _rejected_by(run: Path, rule: str) -> set[str]:
    ledger = pl.from_arrow(RunFolder(run).ledger("filter"))
    return set(ledger.filter(pl.col("rule") == rule)["sample_id"].to_list())


def test_threshold_change_rescores_only_newly_kept(workspace):
    """Relaxing one filter threshold re-decides the samples it touched; the newly kept ones
    are scored (and nothing else is) before pack sees them."""
    strict = {"rules": {"zero_run": {"threshold": 24, "severity": "reject"}}}
    curate_run(write_pipeline(workspace, filter=strict))
    run = workspace["run"]
    newly_kept = _rejected_by(run, "zero_run")
    assert newly_kept and not newly_kept & ids(run, "scores")
    memo_before = {p.name: len(pl.read_parquet(p)) for p in (run / "_cache" / "score").glob("*")}
    scored_before = _memo_ids(run)

    curate_run(write_pipeline(workspace, filter={"rules": {"zero_run": {"threshold": 10_000}}}))
    assert not _rejected_by(run, "zero_run")
    assert newly_kept <= ids(run, "scores") and newly_kept <= ids(run, "pack")
    again = redone(run)
    assert len(again["filter"]) == len(RunFolder(run).shards("samples"))  # settings changed
    touched = {
        f"{p.stem}"
        for p in (run / "_cache" / "score").glob("*")
        if len(pl.read_parquet(p)) != memo_before.get(p.name)
    }
    assert set(again["score"]) == touched and 1 <= len(touched) <= len(newly_kept)
    assert _memo_ids(run) - scored_before == newly_kept  # the judge saw nothing else
    assert again["ingest"] == again["budget"] == []


def _memo_ids(run: Path) -> set[str]:
    """Samples the judge has answered for (its memo of raw results)."""
    files = sorted((run / "_cache" / "score").glob("*.parquet"))
    return set(pl.read_parquet(files)["sample_id"].to_list()) if files else set()


def test_raising_the_token_cap_packs_over_cap_samples_on_first_rerun(workspace):
    run = workspace["run"]
    curate_run(write_pipeline(workspace, pack={"max_tokens": 1024}))
    over = set(pl.from_arrow(RunFolder(run).ledger("pack"))["sample_id"].to_list())
    assert over, "the demo has samples over 1024 tokens"
    first_in = read_json(run / "stats" / "pack.json")["report"]["samples_in"]

    curate_run(write_pipeline(workspace, pack={"max_tokens": 8192}))
    report = read_json(run / "stats" / "pack.json")["report"]
    assert report["samples_in"] == first_in  # pack's status never reads its own ledger
    assert report["samples_rejected"] == 0
    assert over <= ids(run, "pack") and over - _not_drawn(run) <= packed_ids(run)
    assert redone(run)["tokenize"] == []


def _not_drawn(run: Path) -> set[str]:
    outcomes = table(run, "pack")
    return set(outcomes.filter(pl.col("copies") == 0)["sample_id"].to_list())


def test_removed_dataset_vanishes_from_every_stage(workspace):
    path = write_pipeline(workspace)
    curate_run(path)
    run = workspace["run"]
    samples = table(run, "samples")
    doc_ids = set(samples.filter(pl.col("dataset") == "doc_ocr")["sample_id"].to_list())
    assert doc_ids & packed_ids(run)
    meta = orjson.loads(workspace["meta"].read_bytes())
    del meta["doc_ocr"]
    workspace["meta"].write_bytes(orjson.dumps(meta))

    curate_run(path)
    folder = RunFolder(run)
    for name in ("samples", "budget", "filter", "scores", "tokens", "pack"):
        assert "doc_ocr" not in set(table(run, name)["dataset"].to_list()), name
    assert "doc_ocr" not in set(pl.from_arrow(folder.ledger())["dataset"].to_list())
    assert not [s for s in folder.shards("duplicates") if s.startswith("doc_ocr")]
    for stage in ("ingest", "budget", "filter", "score", "tokenize"):
        assert not list((run / "_done" / stage).glob("doc_ocr-*")), stage
    copies = pl.read_parquet(run / "repeat" / "copies.parquet")
    assert "doc_ocr" not in set(copies["dataset"].to_list())
    assert not doc_ids & packed_ids(run)
    assert "doc_ocr" not in folder.datasets()
    assert redone(run)["ingest"] == []  # the other datasets' shards are untouched
    assert redone(run)["filter"] == []
