"""Where each budget setting comes from: the meta JSON (per dataset) or the pipeline file.

A dataset's own ``max_dynamic_patch`` / ``min_dynamic_patch`` in the meta JSON beat the
pipeline's ``stages.budget`` value, which applies to datasets whose meta entry sets none (as
InternVL's ``max_dynamic_patch`` from the meta file beats its command-line one). Every other
budget setting exists only in the pipeline file. Every setting is checked end to end: meta JSON
-> ingest -> budget -> repeat.
"""

from __future__ import annotations

import orjson
import pytest
from PIL import Image

from curate.core.folder import RunFolder
from curate.core.io import read_json
from curate.stages.budget.config import BudgetConfig
from curate.stages.budget.stage import BudgetStage, RepeatStage
from curate.stages.ingest.config import IngestConfig
from curate.stages.ingest.meta import MetaEntry
from curate.stages.ingest.stage import IngestStage
from tests.conftest import run_stages

# Per budget setting: "meta" (a dataset's meta value wins, the pipeline's is the default) or
# "pipeline" (the meta JSON has no such field).
SOURCE = {
    "max_dynamic_patch": "meta",
    "min_dynamic_patch": "meta",
    "image_size": "pipeline",
    "use_thumbnail": "pipeline",
    "video_frames": "pipeline",
    "repeat_mode": "pipeline",
    "seed": "pipeline",
    "system_prompt": "pipeline",
    "target_tokens": "pipeline",
    "weights": "pipeline",
    "weight_basis": "pipeline",
    "workers": "pipeline",
}


def _turns(question: str) -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": "An answer."}]


def _write_mixture(tmp_path, meta_fields: dict) -> str:
    """One dataset: a 512x512 image, a 1600x400 image, a 16-frame video, a text line."""
    root = tmp_path / "root"
    (root / "clip").mkdir(parents=True)
    Image.new("RGB", (512, 512), "white").save(root / "square.png")
    Image.new("RGB", (1600, 400), "white").save(root / "wide.png")
    for k in range(16):
        Image.new("RGB", (32, 32)).save(root / "clip" / f"f{k:02d}.jpg")
    lines = [
        {"id": "square", "image": "square.png", "conversations": _turns("<image>\nWhat?")},
        {"id": "wide", "image": "wide.png", "conversations": _turns("<image>\nWhat?")},
        {"id": "video", "video": "clip", "conversations": _turns("<video>\nWhat?")},
        {"id": "text", "conversations": _turns("Hello?")},
    ]
    (tmp_path / "ann.jsonl").write_bytes(b"\n".join(orjson.dumps(x) for x in lines) + b"\n")
    entry = {"root": "root", "annotation": "ann.jsonl", **meta_fields}
    (tmp_path / "meta.json").write_bytes(orjson.dumps({"ds": entry}))
    return str(tmp_path / "meta.json")


def _budget(tmp_path, tokenizer_dir, meta_fields: dict | None = None, **settings):
    """Budget rows by line id, and the budget table row of the dataset."""
    meta = _write_mixture(tmp_path, meta_fields or {})
    run = RunFolder(tmp_path / "run")
    cfg = BudgetConfig(**settings)
    run_stages(run, IngestStage(IngestConfig(), meta), BudgetStage(cfg, tokenizer_dir))
    run_stages(run, RepeatStage(cfg))
    ids = {s["sample_id"]: orjson.loads(s["extra"])["id"] for s in run.read("samples").to_pylist()}
    rows = {ids[b["sample_id"]]: b for b in run.read("budget").to_pylist()}
    (table,) = read_json(run.path / "repeat" / "budget_table.json")
    return rows, table


def test_every_budget_setting_has_a_declared_source():
    assert set(SOURCE) == set(BudgetConfig.model_fields)
    meta_fields = set(MetaEntry.model_fields)
    for name, source in SOURCE.items():
        assert (name in meta_fields) == (source == "meta"), name


# (meta JSON fields, pipeline settings, line, expected tiles of that line's image)
TILING_CASES = {
    # min_dynamic_patch: InternVL with min 4 gives a 512x512 image 2x2 + thumbnail.
    "min: pipeline, meta unset": ({}, {"min_dynamic_patch": 4}, "square", 5),
    "min: meta beats pipeline": ({"min_dynamic_patch": 1}, {"min_dynamic_patch": 4}, "square", 1),
    "min: meta over the default": ({"min_dynamic_patch": 4}, {}, "square", 5),
    "min: defaults": ({}, {}, "square", 1),
    # max_dynamic_patch: a 4:1 image takes 4x1 + thumbnail at n_max >= 4, 2x1 + 1 at 2.
    "max: pipeline, meta unset": ({}, {"max_dynamic_patch": 2}, "wide", 3),
    "max: meta beats pipeline": ({"max_dynamic_patch": 2}, {"max_dynamic_patch": 12}, "wide", 3),
    "max: meta beats smaller pipeline": (
        {"max_dynamic_patch": 12},
        {"max_dynamic_patch": 2},
        "wide",
        5,
    ),
    "max: defaults": ({}, {}, "wide", 5),
    # Pipeline-only tiling settings.
    "image_size": ({}, {"image_size": 224}, "square", 3 * 3 + 1),
    "use_thumbnail": ({}, {"use_thumbnail": False}, "wide", 4),
    "video_frames": ({}, {"video_frames": 4}, "video", 4),
    "video_frames default": ({}, {}, "video", 8),
}


@pytest.mark.parametrize("case", sorted(TILING_CASES))
def test_tiling_setting_source(case, tmp_path, tokenizer_dir):
    meta_fields, settings, line, tiles = TILING_CASES[case]
    rows, _ = _budget(tmp_path, tokenizer_dir, meta_fields, **settings)
    assert rows[line]["tiles"] == tiles


def test_system_prompt_comes_from_the_pipeline(tmp_path, tokenizer_dir):
    default, _ = _budget(tmp_path / "a", tokenizer_dir)
    none, _ = _budget(tmp_path / "b", tokenizer_dir, system_prompt=None)
    assert none["text"]["text_tokens"] < default["text"]["text_tokens"]


def test_workers_change_nothing_but_speed(tmp_path, tokenizer_dir):
    one, _ = _budget(tmp_path / "a", tokenizer_dir)
    two, _ = _budget(tmp_path / "b", tokenizer_dir, workers=2)
    assert one == two


def test_repeat_time_from_meta_and_repeat_settings_from_pipeline(tmp_path, tokenizer_dir):
    """repeat_time is the meta's; repeat_mode and seed say how copies are drawn from it."""
    _, internvl = _budget(tmp_path / "a", tokenizer_dir, {"repeat_time": 2.5})
    assert internvl["repeat_time"] == 2.5 and internvl["copies"] == 4 * 2  # int(r) each
    copies = {
        seed: _budget(
            tmp_path / f"seed{seed}",
            tokenizer_dir,
            {"repeat_time": 2.5},
            repeat_mode="stable",
            seed=seed,
        )[1]["copies"]
        for seed in range(6)
    }
    assert all(4 * 2 <= c <= 4 * 3 for c in copies.values())
    assert len(set(copies.values())) > 1  # the seed decides which samples get a third copy


def test_target_tokens_and_weights_rescale_the_meta_repeat_time(tmp_path, tokenizer_dir):
    rows, plain = _budget(tmp_path / "a", tokenizer_dir, {"repeat_time": 2})
    tokens = sum(r["total_tokens"] for r in rows.values())
    _, solved = _budget(
        tmp_path / "b", tokenizer_dir, {"repeat_time": 2}, target_tokens=10 * tokens
    )
    assert solved["repeat_time"] == pytest.approx(10.0, abs=1e-3)
    # One dataset: a weight or the equal basis cannot change its share, only the target can.
    _, weighted = _budget(
        tmp_path / "c",
        tokenizer_dir,
        {"repeat_time": 2},
        target_tokens=10 * tokens,
        weights={"ds": 3},
        weight_basis="equal",
    )
    assert weighted["repeat_time"] == pytest.approx(10.0, abs=1e-3)
    assert plain["repeat_time"] == 2
