"""A pipeline file made into engine stages; single commands refuse stale or missing inputs."""

from __future__ import annotations

import pytest

from curate.core.engine import StageOrderError
from curate.pipeline.config import validate
from curate.pipeline.run import Pipeline, build_stages


def _config(run, demo_dir, tokenizer_dir, **filter_cfg):
    return validate(
        {
            "run": str(run),
            "meta": str(demo_dir / "meta.json"),
            "models": {"tokenizer": str(tokenizer_dir)},
            "stages": {
                "ingest": {"shard_lines": 40},
                "budget": {},
                "filter": {"workers": 1, **filter_cfg},
                "pack": {"max_tokens": 8192, "max_tiles": 40},
            },
        },
        "test",
    )


def test_sections_become_engine_stages_in_order(tmp_path, demo_dir, tokenizer_dir):
    names = [s.name for s in build_stages(_config(tmp_path, demo_dir, tokenizer_dir))]
    assert names == ["ingest", "budget", "repeat", "duplicates", "filter", "tokenize", "pack"]
    pack = build_stages(_config(tmp_path, demo_dir, tokenizer_dir))[-1]
    assert pack.respects == ("filter", "tokenize") and pack.requires == ()


def test_single_command_refuses_missing_then_stale_upstream(tmp_path, demo_dir, tokenizer_dir):
    run = tmp_path / "run"
    p = Pipeline(_config(run, demo_dir, tokenizer_dir))
    with pytest.raises(StageOrderError, match="ingest"):
        p.run_section("filter")
    p.run_stages()
    stricter = {"rules": {"zero_run": {"threshold": 5, "severity": "reject"}}}
    changed = Pipeline(_config(run, demo_dir, tokenizer_dir, **stricter))
    with pytest.raises(StageOrderError, match="filter is not up to date .*settings changed"):
        changed.run_section("pack")
    planned = {item.plan.stage: item for item in changed.plan()}
    assert planned["filter"].plan.todo and planned["pack"].waits_for == "filter"
    assert not planned["budget"].plan.todo and not planned["budget"].waits_for
    changed.run_section("filter")
    summary = changed.run_section("pack")["pack"]
    assert summary.redone == ["all"]
    assert not any(item.plan.todo for item in changed.plan())


@pytest.mark.parametrize("filter_section", [None, {"workers": 1, "decode_images": False}])
def test_no_image_reaches_packs_unverified(tmp_path, demo_dir, tokenizer_dir, filter_section):
    """Without a filter stage that decodes pixels, tokenize decodes every image and rejects the
    samples whose images cannot be decoded (the demo has a truncated JPEG): none is packed."""
    import polars as pl

    from curate.core.folder import RunFolder

    stages = {"ingest": {"shard_lines": 40}, "budget": {}, "pack": {"max_tokens": 8192}}
    if filter_section is not None:
        stages["filter"] = filter_section
    config = validate(
        {
            "run": str(tmp_path / "run"),
            "meta": str(demo_dir / "meta.json"),
            "models": {"tokenizer": str(tokenizer_dir)},
            "stages": stages,
        },
        "test",
    )
    Pipeline(config).run_stages()
    run = RunFolder(tmp_path / "run")
    ledger = pl.from_arrow(run.ledger("tokenize"))
    bad = ledger.filter(pl.col("rule") == "image_unreadable")
    assert len(bad) >= 1 and bad["detail"].str.contains("bad_truncated.jpg").all()
    packed = pl.read_parquet(run.path / "pack" / "all.parquet").filter(pl.col("copies") > 0)
    assert len(packed) and not set(bad["sample_id"]) & set(packed["sample_id"])


def test_filter_that_decodes_spares_tokenize_the_work(tmp_path, demo_dir, tokenizer_dir):
    tokenize = build_stages(_config(tmp_path, demo_dir, tokenizer_dir))[-2]
    assert tokenize.name == "tokenize" and not tokenize.verify_images


def test_shard_stages_use_every_core_unless_told(tmp_path, demo_dir, tokenizer_dir, monkeypatch):
    import os

    from curate.core.stage import ShardStage

    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    config = validate(
        {
            "run": str(tmp_path),
            "meta": str(demo_dir / "meta.json"),
            "models": {"tokenizer": str(tokenizer_dir)},
            "stages": {"ingest": {}, "budget": {}, "filter": {}, "pack": {"workers": 2}},
        },
        "test",
    )
    workers = {s.name: s.workers for s in build_stages(config) if isinstance(s, ShardStage)}
    assert workers == {"ingest": 6, "budget": 6, "filter": 6, "tokenize": 2}
