"""Training tokenisation of every budgeted sample (``tokens/`` shards, resumable per shard).

Each sample goes through the ``internvl2_5`` template with every ``<image>`` expanded to
``<img>`` + ``<IMG_CONTEXT>`` x 256·tiles + ``</img>`` using the grids the budget chose, and
gets InternVL's labels (answers and their ``<|im_end|>`` only). Review decisions do not affect
this step, so changing a decision later re-packs without re-tokenising.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pyarrow as pa

from curate.budget.stage import cached_tokenizer
from curate.budget.tiling import tokens_per_tile
from curate.chat import IGNORE_INDEX, segments, tokenize
from curate.ingest.stage import load_datasets
from curate.io import read_json
from curate.pack.config import PackConfig
from curate.records import ledger_table
from curate.run import RunFolder, ShardResult, StageSummary, run_shards, settings_fingerprint

STAGE = "tokenize"
TOKEN_IMAGE_TYPE = pa.struct(
    [
        ("path", pa.string()),
        ("cols", pa.int16()),
        ("rows", pa.int16()),
        ("thumbnail", pa.bool_()),
        ("data_augment", pa.bool_()),
    ]
)
TOKENS_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("dataset", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("n_tokens", pa.int32()),
        ("n_supervised", pa.int32()),
        ("tiles", pa.int32()),
        ("images", pa.list_(TOKEN_IMAGE_TYPE)),  # in token order (video: the sampled frames)
    ]
)


def tokenize_sample(
    sample: dict,
    budget: dict,
    tokenizer,
    *,
    data_augment: bool,
    system_prompt: str | None,
    per_tile: int = 256,
) -> dict:
    """One sample's training row: ids, labels, counts and the images with their grids."""
    grids = budget["grids"]
    if sample["kind"] == "video":
        sources = [sample["images"][i] for i in budget["frame_indices"]]
    else:
        sources = sample["images"]
    counts = [per_tile * (g["cols"] * g["rows"] + int(g["thumbnail"])) for g in grids]
    segs = segments(
        sample["conversations"],
        counts,
        system_prompt=system_prompt,
        n_video_frames=len(budget["frame_indices"]),
    )
    ids, labels = tokenize(tokenizer, segs)
    images = [
        {"path": im["path"], **g, "data_augment": data_augment}
        for im, g in zip(sources, grids, strict=True)
    ]
    return {
        "sample_id": sample["sample_id"],
        "dataset": sample["dataset"],
        "input_ids": ids,
        "labels": labels,
        "n_tokens": len(ids),
        "n_supervised": sum(1 for x in labels if x != IGNORE_INDEX),
        "tiles": budget["tiles"],
        "images": images,
    }


def process_shard(
    run: RunFolder,
    cfg: PackConfig,
    tokenizer_path: str,
    datasets: dict,
    image_size: int,
    shard: str,
) -> ShardResult:
    samples = run.read("samples", [shard]).to_pylist()
    budgets = {b["sample_id"]: b for b in run.read("budget", [shard]).to_pylist()}
    tok = cached_tokenizer(tokenizer_path)
    rows = [
        tokenize_sample(
            s,
            budgets[s["sample_id"]],
            tok,
            data_augment=bool(datasets[s["dataset"]]["data_augment"]),
            system_prompt=cfg.system_prompt,
            per_tile=tokens_per_tile(image_size),
        )
        for s in samples
    ]
    by_ds: dict[str, list[int]] = {}
    for s in samples:
        c = by_ds.setdefault(s["dataset"], [0, 0, 0])
        c[0] += 1
        c[1] += 1
    return ShardResult(
        {"tokens": pa.Table.from_pylist(rows, schema=TOKENS_SCHEMA)},
        ledger_table([]),
        len(rows),
        len(rows),
        0,
        rows_by_dataset=by_ds,
    )


def run_tokenize(
    run: RunFolder, cfg: PackConfig, tokenizer: str | Path, image_size: int = 448, on_shard=None
) -> StageSummary:
    """Tokenise every budgeted shard (finished shards are skipped)."""
    shards = run.shards("budget")
    if not shards:
        raise FileNotFoundError(f"{run.path} has no budget/: run `curate budget` first")
    process = partial(process_shard, run, cfg, str(tokenizer), load_datasets(run), image_size)
    # Re-tokenise when the budget changed (its markers' settings and counts), not when it was
    # merely rerun (markers also hold timings).
    budget_markers = [
        {k: v for k, v in read_json(run.marker_path("budget", s)).items() if k != "seconds"}
        for s in shards
    ]
    fingerprint = settings_fingerprint(
        cfg.system_prompt,
        Path(tokenizer).resolve(),
        image_size,
        budget_markers,
    )
    return run_shards(
        run, STAGE, shards, process, workers=cfg.workers, on_shard=on_shard, fingerprint=fingerprint
    )
