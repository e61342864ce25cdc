"""The budget stage: every kept sample's tiles, visual tokens and text tokens, then repeat copies.

Image sizes were read from file headers at ingest, so this stage decodes no pixel. Text tokens
come from the real tokenizer over the ``internvl2_5`` template, each ``<image>`` counted as
``<img></img>`` here and its 256·tiles ``<IMG_CONTEXT>`` tokens added as visual tokens — the
same total the pack stage gets by tokenising the expanded text.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import xxhash

from curate.core.chat import BatchTokenizer, ChatSample, CompactIds
from curate.core.folder import RunFolder
from curate.core.io import path_identity, write_json_atomic, write_parquet_atomic
from curate.core.stage import (
    GlobalInput,
    GlobalOutput,
    GlobalStage,
    ShardInput,
    ShardOutput,
    ShardStage,
    cpu_workers,
)
from curate.stages.budget.config import BudgetConfig
from curate.stages.budget.costs import TilingParams, grid_tiles, image_grids
from curate.stages.budget.repeat import (
    check_weights,
    internvl_copies,
    solve_repeat_factors,
    stable_copies,
)
from curate.stages.budget.tiling import tokens_per_tile

STAGE = "budget"
GRID_TYPE = pa.struct([("cols", pa.int16()), ("rows", pa.int16()), ("thumbnail", pa.bool_())])
BUDGET_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("dataset", pa.string()),
        ("line", pa.int64()),
        ("n_images", pa.int32()),
        ("grids", pa.list_(GRID_TYPE)),  # per image (per sampled frame for video), in order
        ("frame_indices", pa.list_(pa.int32())),  # video: which frames are used
        ("tiles", pa.int32()),
        ("visual_tokens", pa.int32()),  # 256 per tile + <img></img> per image
        ("text_tokens", pa.int32()),
        ("total_tokens", pa.int32()),
        # The template tokeniser's ids and labels with no image context tokens, and where each
        # image's run goes: the tokenize stage adds the runs at these grids instead of
        # tokenising the text again. Null when the tokenizer needs per-sample tokenising.
        ("text_ids", pa.list_(pa.int32())),
        ("text_labels", pa.list_(pa.int32())),
        ("image_slots", pa.list_(pa.int32())),
        ("text_ids_key", pa.string()),  # the tokenizer and system prompt that made text_ids
    ]
)
CHUNK_ROWS = 4096  # samples made Python objects at once: memory by chunk, not by shard
# What only tokenize reads.
TOKEN_COLUMNS = ("text_ids", "text_labels", "image_slots", "text_ids_key")
COPIES_SCHEMA = pa.schema(
    [("sample_id", pa.string()), ("dataset", pa.string()), ("copies", pa.int32())]
)


def load_tokenizer(path: str):
    """A Hugging Face tokenizer from a local directory (never from a hub)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


_TOKENIZERS: dict[str, object] = {}


def cached_tokenizer(path: str):
    # One load per process: worker processes reuse it across shards.
    if path not in _TOKENIZERS:
        _TOKENIZERS[path] = load_tokenizer(path)
    return _TOKENIZERS[path]


_BATCH_TOKENIZERS: dict[str, BatchTokenizer] = {}


def cached_batch_tokenizer(path: str) -> BatchTokenizer:
    """The template tokeniser over ``cached_tokenizer(path)`` (its self-check runs once)."""
    if path not in _BATCH_TOKENIZERS:
        _BATCH_TOKENIZERS[path] = BatchTokenizer(cached_tokenizer(path))
    return _BATCH_TOKENIZERS[path]


def _meta_or_pipeline(dataset: dict, cfg: BudgetConfig, key: str) -> int:
    """A dataset's own value in the meta JSON beats the pipeline's, which applies where the
    meta sets none (InternVL: the meta file's max_dynamic_patch beats the global one)."""
    value = dataset.get(key)
    return getattr(cfg, key) if value is None else value


def _tiling_for(dataset: dict, cfg: BudgetConfig) -> TilingParams:
    return TilingParams(
        max_tiles=_meta_or_pipeline(dataset, cfg, "max_dynamic_patch"),
        min_tiles=_meta_or_pipeline(dataset, cfg, "min_dynamic_patch"),
        image_size=cfg.image_size,
        use_thumbnail=cfg.use_thumbnail,
        video_frames=cfg.video_frames,
    )


def text_ids_key(tokenizer_identity: str, system_prompt: str | None) -> str:
    """What the template tokeniser's ids depend on besides the sample: the tokenizer (by its
    files) and the default system prompt. Tokenize reuses the budget's ids only under the
    same key."""
    return xxhash.xxh3_64_hexdigest(f"{tokenizer_identity}\0{system_prompt!r}".encode())


def budget_rows(
    rows: list[dict],
    datasets: dict[str, dict],
    cfg: BudgetConfig,
    tokenizer: BatchTokenizer,
    ids_key: str | None = None,
) -> list[dict]:
    """Budget columns for sample rows (the text of the whole batch tokenised at once)."""
    per_tile = tokens_per_tile(cfg.image_size)
    out, chats = [], []
    for row in rows:
        grids, frames = image_grids(
            row["images"], row["kind"], _tiling_for(datasets[row["dataset"]], cfg)
        )
        chats.append(
            ChatSample(
                row["conversations"],
                [0] * len(grids),  # text only: <img></img> per image, counted as visual
                system_prompt=cfg.system_prompt,
                n_video_frames=len(frames),
            )
        )
        tiles = sum(grid_tiles(g) for g in grids)
        out.append(
            {
                "sample_id": row["sample_id"],
                "dataset": row["dataset"],
                "line": row["line"],
                "n_images": len(grids),
                "grids": grids,
                "frame_indices": frames,
                "tiles": tiles,
                "visual_tokens": per_tile * tiles + 2 * len(grids),
            }
        )
    compact = tokenizer.compact(chats)
    reusable = compact is not None
    if not reusable:  # per-sample tokenising: no image slots to record, lengths only
        compact = [CompactIds(ids, [], [], []) for ids, _ in tokenizer(chats)]
    for r, c in zip(out, compact, strict=True):
        r["text_tokens"] = len(c.input_ids) - 2 * r["n_images"]  # <img></img> counted as visual
        r["total_tokens"] = r["text_tokens"] + r["visual_tokens"]
        if reusable:
            r["text_ids"] = np.asarray(c.input_ids, dtype=np.int32)
            r["text_labels"] = np.asarray(c.labels, dtype=np.int32)
            r["image_slots"] = c.context_at
            r["text_ids_key"] = ids_key
    return out


REPEAT_FIELDS = frozenset({"repeat_mode", "seed", "target_tokens", "weights", "weight_basis"})
TILING_KEYS = ("max_dynamic_patch", "min_dynamic_patch")  # per dataset in the meta JSON


class BudgetStage(ShardStage):
    """Tiles, visual and text tokens of every ingested sample (``budget/``)."""

    name = STAGE
    reads = ("ingest",)
    speed_fields = frozenset({"workers"}) | REPEAT_FIELDS

    def __init__(self, config: BudgetConfig, tokenizer: str | Path) -> None:
        super().__init__(config)
        self.tokenizer = str(Path(tokenizer).resolve())
        self.workers = cpu_workers(config.workers)
        self.datasets: dict[str, dict] = {}

    def settings(self) -> dict:
        return {**super().settings(), "tokenizer": path_identity(self.tokenizer)}

    def shard_inputs(self, run: RunFolder, shard: str) -> dict[str, str]:
        # A dataset's own tiling settings in the meta JSON decide its grids.
        # The shard's datasets, from ingest's marker (no need to read the shard itself).
        names = set((run.marker("ingest", shard) or {}).get("by_dataset", {}))
        datasets = run.datasets()
        tiling = {n: [datasets.get(n, {}).get(k) for k in TILING_KEYS] for n in sorted(names)}
        return {"tiling": str(tiling)}

    def prepare(self, run: RunFolder) -> None:
        self.datasets = run.datasets()
        self.ids_key = text_ids_key(path_identity(self.tokenizer), self.config.system_prompt)
        check_weights(self.config.weights, self.datasets)  # before tokenising anything

    def process(self, shard: ShardInput) -> ShardOutput:
        samples = shard.table("samples")
        tokenizer = cached_batch_tokenizer(self.tokenizer)
        parts = [BUDGET_SCHEMA.empty_table()]
        for start in range(0, samples.num_rows, CHUNK_ROWS):  # Python rows of a chunk at a time
            rows = samples.slice(start, CHUNK_ROWS).to_pylist()
            budget = budget_rows(rows, self.datasets, self.config, tokenizer, self.ids_key)
            parts.append(pa.Table.from_pylist(budget, schema=BUDGET_SCHEMA))
        return ShardOutput(pa.concat_tables(parts))


class RepeatStage(GlobalStage):
    """Copies of every budgeted sample under the repeat mode (``repeat/copies.parquet``), and
    the per-dataset budget table."""

    name = "repeat"
    reads = ("ingest", "budget")  # ingest: its rejections per dataset in the budget table
    outputs = ("repeat",)

    def settings(self) -> dict:
        return self.config.model_dump(mode="json", include=set(REPEAT_FIELDS))

    def extra_inputs(self, run: RunFolder) -> dict[str, str]:
        datasets = run.datasets()
        return {
            "repeat_time": str({n: (d["repeat_time"], d["lines"]) for n, d in datasets.items()})
        }

    def run(self, inp: GlobalInput) -> GlobalOutput:
        table, r = compute_copies(inp.run, self.config)
        write_parquet_atomic(
            table.to_arrow().cast(COPIES_SCHEMA), inp.out / "repeat" / "copies.parquet"
        )
        before = table
        if self.config.target_tokens is not None:  # the meta's repeat_time, for comparison
            before, _ = compute_copies(inp.run, self.config.model_copy(update=NO_SOLVER))
        rows = budget_table(inp.run, table, r, before)
        write_json_atomic(rows, inp.out / "repeat" / "budget_table.json")
        return GlobalOutput(report={"repeat_time": r})


NO_SOLVER = {"target_tokens": None, "weights": None}


def repeat_factors(run: RunFolder, cfg: BudgetConfig, costs: pl.DataFrame) -> dict[str, float]:
    """The meta JSON's repeat_time per dataset, or the mixture solver's r with target_tokens."""
    datasets = run.datasets()
    meta = {name: float(d["repeat_time"]) for name, d in datasets.items()}
    if cfg.target_tokens is None:
        return meta
    tokens = costs.group_by("dataset").agg(pl.col("total_tokens").sum())
    per_ds = {name: 0 for name in datasets} | dict(tokens.iter_rows())
    return solve_repeat_factors(
        per_ds, cfg.target_tokens, cfg.weights, basis=cfg.weight_basis, repeat_times=meta
    )


def compute_copies(run: RunFolder, cfg: BudgetConfig) -> tuple[pl.DataFrame, dict[str, float]]:
    """Copies of every budgeted sample under the configured repeat mode."""
    costs = pl.from_arrow(
        run.read(
            "budget", schema=BUDGET_SCHEMA, columns=["sample_id", "dataset", "line", "total_tokens"]
        )
    )
    r = repeat_factors(run, cfg, costs)
    lines = {n: d["lines"] for n, d in run.datasets().items()}
    parts = []
    for (name,), part in costs.group_by(["dataset"], maintain_order=True):
        if cfg.repeat_mode == "internvl":
            copies = internvl_copies(part["line"].to_numpy(), lines[name], r[name])
        else:
            copies = stable_copies(part["sample_id"].to_list(), r[name], cfg.seed)
        parts.append(part.select("sample_id", "dataset").with_columns(copies=pl.Series(copies)))
    table = (
        pl.concat(parts)
        if parts
        else pl.DataFrame(schema={"sample_id": pl.String, "dataset": pl.String, "copies": pl.Int32})
    )
    return table, r


EMPTY_ROW = {
    "samples": 0,
    "images": 0,
    "tiles": 0,
    "visual_tokens": 0,
    "text_tokens": 0,
    "copies": 0,
    "effective_tokens": 0,
}


def budget_table(
    run: RunFolder, copies: pl.DataFrame, r: dict[str, float], before: pl.DataFrame | None = None
) -> list[dict]:
    """Per-dataset totals: samples kept/rejected, images, tiles, tokens, r, effective tokens,
    and each dataset's share of the effective tokens before (``before``: the copies at the
    meta JSON's repeat_time) and after (``copies``) the mixture solver."""
    columns = [c for c in BUDGET_SCHEMA.names if c not in TOKEN_COLUMNS]
    costs = pl.from_arrow(run.read("budget", columns=columns, schema=BUDGET_SCHEMA))
    costs = costs.drop(["grids", "frame_indices"])
    share_before = _shares(costs, copies if before is None else before)
    share_after = _shares(costs, copies)
    df = costs.join(copies.select("sample_id", "copies"), on="sample_id", how="left")
    agg = df.group_by("dataset").agg(
        pl.len().alias("samples"),
        pl.col("n_images").sum().alias("images"),
        pl.col("tiles").sum(),
        pl.col("visual_tokens").sum(),
        pl.col("text_tokens").sum(),
        pl.col("copies").sum(),
        (pl.col("total_tokens") * pl.col("copies")).sum().alias("effective_tokens"),
    )
    by_name = {row["dataset"]: row for row in agg.iter_rows(named=True)}
    ingest = (run.stats("ingest") or {}).get("by_dataset", {})
    table = []
    for name in run.datasets():
        row = by_name.get(name, EMPTY_ROW)
        table.append(
            {
                "dataset": name,
                **{k: v for k, v in row.items() if k != "dataset"},
                "rejected": ingest.get(name, [0, 0, 0])[2],
                "repeat_time": round(r.get(name, 0.0), 4),
                "share_before": share_before.get(name, 0.0),
                "share_after": share_after.get(name, 0.0),
            }
        )
    return table


def _shares(costs: pl.DataFrame, copies: pl.DataFrame) -> dict[str, float]:
    """Each dataset's fraction of the effective tokens (tokens x copies), to 4 decimals."""
    df = costs.join(copies.select("sample_id", "copies"), on="sample_id", how="left")
    tokens = dict(
        df.group_by("dataset")
        .agg((pl.col("total_tokens") * pl.col("copies").fill_null(0)).sum())
        .iter_rows()
    )
    total = sum(tokens.values())
    return {d: round(n / total, 4) if total else 0.0 for d, n in tokens.items()}
