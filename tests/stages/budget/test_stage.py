"""The budget stage on the demo run: exact token totals, video frames, copies, stats."""

from __future__ import annotations

import polars as pl
import pytest

from curate.core.chat import BatchTokenizer, segments, tokenize
from curate.core.folder import RunFolder
from curate.core.io import read_json
from curate.stages.budget.config import BudgetConfig
from curate.stages.budget.costs import frame_indices
from curate.stages.budget.repeat import MixtureError
from curate.stages.budget.stage import BudgetStage, RepeatStage, budget_rows, load_tokenizer
from tests.conftest import run_stages


def run_budget(run: RunFolder, cfg: BudgetConfig, tokenizer_dir) -> dict:
    """The budget and repeat stages through the engine; their summaries by stage name."""
    return run_stages(run, BudgetStage(cfg, tokenizer_dir), RepeatStage(cfg))


def test_total_tokens_equal_full_tokenisation(budgeted_run, tokenizer_dir):
    """Budget counts <img></img> + 256/tile; tokenising the fully expanded text gives the same."""
    run = RunFolder(budgeted_run)
    tok = load_tokenizer(tokenizer_dir)
    samples = {r["sample_id"]: r for r in run.read("samples").to_pylist()}
    budget = run.read("budget").to_pylist()
    kinds = set()
    for b in budget[::3]:
        s = samples[b["sample_id"]]
        kinds.add(s["kind"])
        counts = [256 * (g["cols"] * g["rows"] + g["thumbnail"]) for g in b["grids"]]
        segs = segments(s["conversations"], counts, n_video_frames=len(b["frame_indices"]))
        ids, labels = tokenize(tok, segs)
        assert len(ids) == b["total_tokens"], s["sample_id"]
        assert ids.count(tok.convert_tokens_to_ids("<IMG_CONTEXT>")) == 256 * b["tiles"]
        assert b["visual_tokens"] == 256 * b["tiles"] + 2 * b["n_images"]
    assert kinds == {"text", "image", "multi_image", "video"}


def test_multi_image_and_video_budgets(budgeted_run):
    run = RunFolder(budgeted_run)
    df = pl.from_arrow(run.read("budget")).join(
        pl.from_arrow(run.read("samples").select(["sample_id", "kind", "images"])), on="sample_id"
    )
    for row in df.filter(pl.col("kind") == "multi_image").iter_rows(named=True):
        cap = max(1, 12 // len(row["images"]))
        assert all(g["cols"] * g["rows"] <= cap for g in row["grids"])
    for row in df.filter(pl.col("kind") == "video").iter_rows(named=True):
        assert row["tiles"] == min(8, len(row["images"])) == len(row["frame_indices"])
        assert all(g == {"cols": 1, "rows": 1, "thumbnail": False} for g in row["grids"])


def internvl_middle_frames(vlen: int, num_frames: int) -> list[int]:
    """An independent reading of InternVL's ``get_frame_indices(sample='middle')``: the
    interval boundaries are ``linspace(0, vlen, n + 1)`` truncated, each range ends one frame
    before the next starts, and the frame is the floor of the range's midpoint."""
    n = min(num_frames, vlen)
    bounds = [int(vlen * k / n) for k in range(n + 1)]
    ranges = [(bounds[k], bounds[k + 1] - 1) for k in range(n)]
    return [(start + end) // 2 for start, end in ranges]


def test_frame_indices_middle_of_intervals():
    # By hand: 10 frames, 4 wanted -> ranges 0-1, 2-4, 5-6, 7-9 -> middles 0, 3, 5, 8.
    assert frame_indices(10, 4) == [0, 3, 5, 8]
    assert frame_indices(16, 8) == [0, 2, 4, 6, 8, 10, 12, 14]
    assert frame_indices(5, 8) == [0, 1, 2, 3, 4]
    for vlen in range(1, 60):
        for wanted in (1, 2, 3, 4, 7, 8, 16, 32):
            assert frame_indices(vlen, wanted) == internvl_middle_frames(vlen, wanted)


def test_copies_and_table(budgeted_run):
    run = RunFolder(budgeted_run)
    copies = pl.read_parquet(budgeted_run / "repeat" / "copies.parquet")
    assert len(copies) == len(run.read("budget"))
    by_ds = dict(copies.group_by("dataset").agg(pl.col("copies").sum()).iter_rows())
    assert by_ds["doc_ocr"] == 2 * copies.filter(pl.col("dataset") == "doc_ocr").height
    table = {r["dataset"]: r for r in _table(run)}
    assert table["math_text"]["repeat_time"] == 0.5
    assert table["general_vqa"]["rejected"] > 0


def _table(run):
    return read_json(run.path / "repeat" / "budget_table.json")


def test_solver_and_stable_mode(run_copy, budgeted_run, tokenizer_dir):
    run = RunFolder(run_copy(budgeted_run))
    cfg = BudgetConfig(target_tokens=1_000_000, repeat_mode="stable", weight_basis="equal")
    done = run_budget(run, cfg, tokenizer_dir)
    # Repeat settings change the copies only: no shard is budgeted again.
    assert done["budget"].redone == [] and done["repeat"].redone == ["all"]
    table = _table(run)
    assert done["repeat"].report["repeat_time"] == pytest.approx(
        {r["dataset"]: r["repeat_time"] for r in table}, abs=1e-4
    )
    effective = sum(r["effective_tokens"] for r in table)
    assert abs(effective - 1_000_000) / 1_000_000 < 0.1  # fractional copies are sampled
    shares = [r["effective_tokens"] for r in table]
    assert max(shares) / min(shares) < 1.6  # equal weights: comparable token shares


def test_settings_change_redoes_shards(run_copy, budgeted_run, tokenizer_dir):
    run = RunFolder(run_copy(budgeted_run))
    again = run_budget(run, BudgetConfig(), tokenizer_dir)
    assert again["budget"].shards_skipped == again["budget"].shards > 0
    assert again["repeat"].redone == []
    changed = run_budget(run, BudgetConfig(max_dynamic_patch=4, use_thumbnail=False), tokenizer_dir)
    assert changed["budget"].shards_skipped == 0
    assert changed["repeat"].redone == ["all"]  # it reads the budget, which changed
    grids = [g for row in run.read("budget").column("grids").to_pylist() for g in row]
    assert all(g["cols"] * g["rows"] <= 12 and not g["thumbnail"] for g in grids)


def test_budget_rows_empty_batch(tokenizer_dir):
    empty = budget_rows([], {}, BudgetConfig(), BatchTokenizer(load_tokenizer(tokenizer_dir)))
    assert empty == []


def test_readme_mixture_example_keeps_every_dataset(run_copy, budgeted_run, tokenizer_dir):
    """`--set target_tokens=2000000 --set weights.doc_ocr=2`: every dataset keeps a share;
    doc_ocr's doubles relative to the meta JSON's mixture (natural weights, the default)."""
    run = RunFolder(run_copy(budgeted_run))
    cfg = BudgetConfig(repeat_mode="stable", target_tokens=2_000_000, weights={"doc_ocr": 2})
    run_budget(run, cfg, tokenizer_dir)
    table = {r["dataset"]: r for r in _table(run)}
    meta = run.datasets()
    assert all(r["repeat_time"] > 0 and r["copies"] > 0 for r in table.values())
    scale = {d: table[d]["repeat_time"] / meta[d]["repeat_time"] for d in table}
    assert scale["doc_ocr"] == pytest.approx(2 * scale["general_vqa"], rel=1e-3)
    others = [v for d, v in scale.items() if d != "doc_ocr"]
    assert max(others) == pytest.approx(min(others), rel=1e-3)


def test_budget_table_shows_each_share_before_and_after(run_copy, budgeted_run, tokenizer_dir):
    run = RunFolder(run_copy(budgeted_run))
    run_budget(run, BudgetConfig(repeat_mode="stable"), tokenizer_dir)
    plain = {r["dataset"]: r for r in _table(run)}
    # Without the solver, the shares are those of the meta JSON's repeat_time.
    total = sum(r["effective_tokens"] for r in plain.values())
    for r in plain.values():
        assert r["share_before"] == r["share_after"]
        assert r["share_after"] == pytest.approx(r["effective_tokens"] / total, abs=1e-4)
    cfg = BudgetConfig(target_tokens=1_000_000, weight_basis="equal", repeat_mode="stable")
    run_budget(run, cfg, tokenizer_dir)
    solved = {r["dataset"]: r for r in _table(run)}
    assert {d: r["share_before"] for d, r in solved.items()} == {
        d: r["share_before"] for d, r in plain.items()
    }
    assert sum(r["share_after"] for r in solved.values()) == pytest.approx(1.0, abs=1e-3)
    assert max(r["share_after"] for r in solved.values()) < max(
        r["share_before"] for r in plain.values()
    )


def test_budget_rich_table_prints_the_shares(budgeted_run):
    from rich.console import Console

    from curate.cli.console import budget_rich_table

    console = Console(width=250, record=True)
    console.print(budget_rich_table(_table(RunFolder(budgeted_run))))
    text = console.export_text()
    assert "share before" in text and "share after" in text
    doc = next(line for line in text.splitlines() if "doc_ocr" in line)
    assert "%" in doc


def test_unknown_dataset_in_weights_stops_with_one_line(run_copy, budgeted_run, tokenizer_dir):
    run = RunFolder(run_copy(budgeted_run))
    cfg = BudgetConfig(target_tokens=1000, weights={"nosuch": 2})
    with pytest.raises(MixtureError) as e:
        run_budget(run, cfg, tokenizer_dir)
    assert "nosuch" in str(e.value) and "doc_ocr" in str(e.value) and "\n" not in str(e.value)


def test_cli_readme_example_and_unknown_weight(run_copy, budgeted_run, demo_dir, tokenizer_dir):
    """`curate budget` with the README's settings prints the shares; a weight naming no
    dataset is one error line, exit status 2."""
    from typer.testing import CliRunner

    from curate.cli.main import app

    run = run_copy(budgeted_run)
    config = run.parent / "pipeline.yaml"
    config.write_text(
        f"run: {run}\nmeta: {demo_dir / 'meta.json'}\nmodels: {{tokenizer: {tokenizer_dir}}}\n"
        "stages:\n  ingest: {shard_lines: 40}\n  budget: {}\n"
    )
    base = ["budget", "--run", str(run), "--config", str(config)]
    sets = ["--set", "repeat_mode=stable", "--set", "target_tokens=2000000"]
    ok = CliRunner().invoke(app, [*base, *sets, "--set", "weights.doc_ocr=2"])
    assert ok.exit_code == 0, ok.output
    assert "share before" in ok.output and "share after" in ok.output
    bad = CliRunner().invoke(app, [*base, *sets, "--set", "weights.nosuch=2"])
    assert bad.exit_code == 2, bad.output
    assert bad.output.startswith("error:") and len(bad.output.strip().splitlines()) == 1
    assert "nosuch" in bad.output and "doc_ocr" in bad.output
