"""Build sample rows, images and small run folders for the filter tests."""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from curate.core.folder import RunFolder
from curate.core.io import write_json_atomic, write_parquet_atomic
from curate.core.records import SAMPLE_SCHEMA
from curate.stages.filters.config import FilterConfig
from curate.stages.filters.dedup import DuplicatesStage
from curate.stages.filters.stage import FilterStage
from tests.conftest import run_stages

_VOCABULARY = """the river bridge market garden station library harbor window bicycle lantern
kitchen forest museum street tower quiet crowded bright narrow ancient modern small busy stands
leans rests appears rises waits near under beside behind people walk past slowly"""
_WORDS = _VOCABULARY.split()


def prose(rng: random.Random, sentences: int, words: tuple[int, int] = (6, 14)) -> str:
    """Varied, non-repetitive sentences."""
    out = []
    for _ in range(sentences):
        n = rng.randint(*words)
        out.append(" ".join(rng.choice(_WORDS) for _ in range(n)).capitalize() + ".")
    return " ".join(out)


def sample(
    answer: str | list[str] = "A small cat sits on the mat.",
    *,
    question: str = "What is it?",
    images: list[dict] | None = None,
    dataset: str = "ds_a",
    domain: str = "general",
    line: int = 1,
    kind: str | None = None,
    sid: str | None = None,
) -> dict:
    answers = [answer] if isinstance(answer, str) else answer
    conv = []
    for k, a in enumerate(answers):
        conv += [
            {"role": "human", "text": question if k == 0 else f"And {k}?"},
            {"role": "gpt", "text": a},
        ]
    images = images or []
    if kind is None:
        kind = {0: "text", 1: "image"}.get(len(images), "multi_image")
    return {
        "sample_id": sid or f"{dataset}:{line}",
        "dataset": dataset,
        "line": line,
        "domain": domain,
        "kind": kind,
        "conversations": conv,
        "images": images,
        "video": None,
        "extra": None,
    }


def image(
    path: Path,
    width: int,
    height: int,
    *,
    blank: bool = False,
    truncate: bool = False,
    sixteen_bit: bool = False,
    seed: int = 0,
) -> dict:
    """Write a noisy (or blank, or 16-bit grey) image and return its SAMPLE_SCHEMA entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if sixteen_bit:  # bright 16-bit grey with a few dark pixels: the trainer sees white
        values = np.full((height, width), 40_000, dtype=np.uint16)
        values[:2, : width // 4] = 10
        im = Image.fromarray(values)
    elif blank:
        im = Image.new("RGB", (width, height), (200, 200, 200))
    else:
        rng = np.random.default_rng(seed)
        im = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
    if truncate:
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
        data = buf.getvalue()
        path.write_bytes(data[: len(data) // 2])
    else:
        im.save(path)
    return {"path": str(path), "width": width, "height": height}


def make_run(root: Path, rows: list[dict], shard_size: int = 1000) -> RunFolder:
    """A run folder holding ``rows`` as samples/ shards (and a run.json naming the datasets in
    order of first appearance, as ingest records them). No ingest markers: the filter stages
    run on these shards as they are."""
    run = RunFolder(root)
    datasets: dict[str, dict] = {}
    for r in rows:
        datasets.setdefault(r["dataset"], {"domain": r["domain"]})
    write_json_atomic({"datasets": datasets, "dataset_order": list(datasets)}, root / "run.json")
    for k, start in enumerate(range(0, len(rows), shard_size)):
        table = pa.Table.from_pylist(rows[start : start + shard_size], schema=SAMPLE_SCHEMA)
        write_parquet_atomic(table, run.shard_path("samples", f"t-{k:05d}"))
    return run


def run_filter(run: RunFolder | Path, cfg: FilterConfig):
    """The filter section through the engine (duplicate pass, then rules): filter's summary."""
    return run_stages(run, DuplicatesStage(cfg), FilterStage(cfg))["filter"]
