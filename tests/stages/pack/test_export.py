"""Exports round-trip: the InternVL export, re-ingested by curate or read by InternVL's loader,
gives the samples the run packed with the copies it packed; the HF export embeds the pixels
InternVL reads, at the size the run budgeted."""

from __future__ import annotations

import io
import os
from collections import Counter
from pathlib import Path

import numpy as np
import orjson
import polars as pl
import pytest
from PIL import Image

from curate.core.folder import RunFolder
from curate.core.images import list_frames
from curate.stages.budget.config import BudgetConfig
from curate.stages.budget.stage import BudgetStage, RepeatStage
from curate.stages.ingest.config import IngestConfig
from curate.stages.ingest.stage import IngestStage
from curate.stages.pack.config import PackConfig
from curate.stages.pack.export import export_hf, export_internvl
from curate.stages.pack.stage import PackStage
from curate.stages.pack.tokenize import TokenizeStage
from tests.conftest import run_stages

PACK = PackConfig(max_tokens=8192, max_tiles=40)
ORIENTATION = 0x0112  # the EXIF tag; 6: the camera was turned, show the image rotated 90°


def run_pipeline(meta: Path, run: Path, tokenizer: Path, budget: BudgetConfig) -> RunFolder:
    """Ingest, budget, repeat, tokenize and pack ``meta`` into ``run``."""
    stages = (
        IngestStage(IngestConfig(shard_lines=40), meta),
        BudgetStage(budget, tokenizer),
        RepeatStage(budget),
        TokenizeStage(PACK, tokenizer),
        PackStage(PACK, tokenizer, respects=()),
    )
    run_stages(run, *stages)
    return RunFolder(run)


def sample_key(conversations: list, image_paths: list[str], video: str | None) -> tuple:
    """What a sample is, whatever its dataset name or id: its turns, its images, its video."""
    turns = tuple((t["role"], t["text"]) for t in conversations)
    return turns, tuple(os.path.realpath(p) for p in image_paths), video


def packed_multiset(run: RunFolder) -> Counter:
    """Every sample the run packed, counted as many times as its copies in the packs."""
    copies = dict(pl.from_arrow(run.read("pack").select(["sample_id", "copies"])).iter_rows())
    out: Counter = Counter()
    for s in run.read("samples").to_pylist():
        key = sample_key(s["conversations"], [im["path"] for im in s["images"]], s["video"])
        out[key] += copies.get(s["sample_id"], 0)
    return +out  # drop the samples with no copy


def internvl_reads(meta_path: Path) -> Counter:
    """The lines InternVL's LazySupervisedDataset trains on, as its code reads a meta file:
    r < 1 keeps the first int(len·r) lines, r > 1 must be an int and repeats the lines."""
    out: Counter = Counter()
    for entry in orjson.loads(meta_path.read_bytes()).values():
        lines = Path(entry["annotation"]).read_text().splitlines(keepends=True)
        r = entry["repeat_time"]
        if r < 1:
            lines = lines[: int(len(lines) * r)]
        if r > 1:
            assert isinstance(r, int), f"InternVL asserts repeat_time {r!r} > 1 is an int"
            lines = lines * r
        for line in lines:
            rec = orjson.loads(line)
            turns = [{"role": t["from"], "text": t["value"]} for t in rec["conversations"]]
            images = rec.get("image", [])
            images = [images] if isinstance(images, str) else images
            paths = [os.path.join(entry["root"], p) for p in images]
            video = rec.get("video")
            if video:  # curate lists a video's frames as its images
                paths = list_frames(os.path.join(entry["root"], video))
            out[sample_key(turns, paths, video)] += 1
    return out


@pytest.fixture(scope="module")
def mixed_meta(demo_dir, tmp_path_factory) -> Path:
    """The demo mixture with a fractional factor above 1 (doc_ocr 2.5) and one below
    (math_text 0.5), paths made absolute."""
    meta = orjson.loads((demo_dir / "meta.json").read_bytes())
    for entry in meta.values():
        entry["root"] = str(demo_dir / entry["root"])
        entry["annotation"] = str(demo_dir / entry["annotation"])
    meta["doc_ocr"]["repeat_time"] = 2.5
    assert meta["math_text"]["repeat_time"] == 0.5
    path = tmp_path_factory.mktemp("mixed") / "meta.json"
    path.write_bytes(orjson.dumps(meta))
    return path


@pytest.mark.parametrize("mode", ["internvl", "stable"])
def test_internvl_export_round_trips_samples_and_copies(mode, mixed_meta, tokenizer_dir, tmp_path):
    budget = BudgetConfig(repeat_mode=mode, seed=3)
    run = run_pipeline(mixed_meta, tmp_path / "run", tokenizer_dir, budget)
    packed = packed_multiset(run)
    copies = pl.read_parquet(run.path / "repeat" / "copies.parquet")
    assert (copies["copies"] == 0).any() and (copies["copies"] >= 2).any()  # both factors bite

    meta_path = export_internvl(run, tmp_path / "export")
    meta = orjson.loads(meta_path.read_bytes())
    for name, entry in meta.items():
        base = name.split("@")[0]
        original = run.datasets()[base]
        assert entry["domain"] == original["domain"]  # every meta field the run knew
        assert entry["root"] == original["root"]
        assert entry["data_augment"] == original["data_augment"]
        assert entry["max_dynamic_patch"] == original["max_dynamic_patch"]
        assert isinstance(entry["repeat_time"], int) and entry["repeat_time"] >= 1
        assert entry["length"] == len(Path(entry["annotation"]).read_text().splitlines())
    assert set(run.datasets()) <= set(meta)
    if mode == "stable":  # 2.5 gives 2 or 3 copies: a second entry holds the 3-copy samples
        assert meta["doc_ocr"]["repeat_time"] == 2 and meta["doc_ocr@x3"]["repeat_time"] == 3

    assert internvl_reads(meta_path) == packed  # InternVL trains on what the run packed
    again = run_pipeline(meta_path, tmp_path / "again", tokenizer_dir, budget)
    assert packed_multiset(again) == packed  # and so does curate, re-ingesting the export


def _save_rotated(path: Path, size: tuple[int, int], fmt: str) -> None:
    """An image stored ``size`` wide and high whose EXIF says: rotate it 90° to show it."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    Image.fromarray(pixels).save(path, fmt, exif=exif)


def test_hf_embeds_the_pixels_internvl_reads(tokenizer_dir, tmp_path):
    """datasets applies EXIF orientation on decode, InternVL does not: the embedded image
    must decode to what ``Image.open(path).convert('RGB')`` gives, at the budgeted size."""
    import datasets

    root = tmp_path / "images"
    root.mkdir()
    _save_rotated(root / "turned.jpg", (64, 32), "JPEG")
    _save_rotated(root / "turned.png", (48, 16), "PNG")
    Image.new("RGB", (40, 24), "orange").save(root / "plain.jpg")  # no EXIF: embedded as is
    with Image.open(root / "turned.jpg") as im:
        assert im.getexif()[ORIENTATION] == 6
    conv = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "Noise."}]
    lines = [
        {"image": name, "conversations": conv} for name in ("turned.jpg", "turned.png", "plain.jpg")
    ]
    ann = tmp_path / "photos.jsonl"
    ann.write_bytes(b"".join(orjson.dumps(x) + b"\n" for x in lines))
    meta = tmp_path / "meta.json"
    entry = {"root": str(root), "annotation": str(ann), "repeat_time": 2, "domain": "photo"}
    meta.write_bytes(orjson.dumps({"photos": entry}))
    run = RunFolder(tmp_path / "run")
    budget = BudgetConfig()
    run_stages(
        run.path,
        IngestStage(IngestConfig(), meta),
        BudgetStage(budget, tokenizer_dir),
        RepeatStage(budget),
    )

    export_hf(run, tmp_path / "hf", embed_images=True)
    ds = datasets.load_from_disk(str(tmp_path / "hf"))
    budgeted = {s["sample_id"]: s["images"][0] for s in run.read("samples").to_pylist()}
    assert len(ds) == len(budgeted) == 3
    for row in ds:
        image = row["images"][0]
        want = budgeted[row["sample_id"]]
        assert image.size == (want["width"], want["height"])  # not turned
        with Image.open(want["path"]) as im:
            internvl = np.asarray(im.convert("RGB"))
        assert np.array_equal(np.asarray(image.convert("RGB")), internvl)
        assert row["copies"] == 2 and row["domain"] == "photo" and row["dataset"] == "photos"
    # The JPEG is embedded as it was but for its orientation value (its pixels not re-encoded);
    # the PNG, whose EXIF cannot be edited in place, as the RGB pixels InternVL reads.
    raw = ds.cast_column("images", [datasets.Image(decode=False)])
    stored = {r["sample_id"]: r["images"][0]["bytes"] for r in raw}
    for sample_id, want in budgeted.items():
        original = Path(want["path"]).read_bytes()
        if want["path"].endswith("plain.jpg"):
            assert stored[sample_id] == original
        elif want["path"].endswith(".jpg"):
            assert len(stored[sample_id]) == len(original)
            diff = np.frombuffer(stored[sample_id], np.uint8) != np.frombuffer(original, np.uint8)
            assert diff.sum() == 1  # the orientation value, 6 -> 1
        else:
            assert stored[sample_id].startswith(b"\x89PNG")
        with Image.open(io.BytesIO(stored[sample_id])) as im:
            assert im.getexif().get(ORIENTATION) in (None, 1)


def test_a_run_without_repeat_exports_internvl_copies_of_its_meta(ingested_run, tmp_path):
    """No repeat stage: the copies InternVL draws from the meta's repeat_time (math_text 0.5:
    the first half of its file), written with repeat_time 1, not 0.5 a second time."""
    run = RunFolder(ingested_run)
    meta = orjson.loads(export_internvl(run, tmp_path / "export").read_bytes())
    n_lines = run.datasets()["math_text"]["lines"]
    drawn = [
        s
        for s in run.read("samples").to_pylist()
        if s["dataset"] == "math_text" and s["line"] <= int(n_lines * 0.5)
    ]
    assert meta["math_text"]["repeat_time"] == 1 and meta["math_text"]["length"] == len(drawn)
    assert meta["doc_ocr"]["repeat_time"] == 2 and meta["doc_ocr"]["domain"] == "ocr"
