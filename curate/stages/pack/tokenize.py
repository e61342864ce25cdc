"""Training tokenisation of every budgeted sample (``tokens/`` shards, resumable per shard).

Each sample goes through the ``internvl2_5`` template with every ``<image>`` expanded to
``<img>`` + ``<IMG_CONTEXT>`` x 256·tiles + ``</img>`` using the grids the budget chose, and
gets InternVL's labels (answers and their ``<|im_end|>`` only). Rows are stored compact: the
context runs are cut out and recorded as (position, length) (``curate.stages.pack.store``);
``n_tokens`` counts the full sequence. Review decisions do not affect this step, so changing a
decision later re-packs without re-tokenising.

No image reaches training unverified: when no filter stage decodes pixels (a pipeline without
``filter``, or ``decode_images: false``), this stage decodes every image once per shard and
rejects the samples whose images cannot be decoded (``image_unreadable``), as the filter would.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.core.chat import IGNORE_INDEX, IMG_CONTEXT, BatchTokenizer, ChatSample, CompactIds
from curate.core.folder import RunFolder
from curate.core.images import decode_error
from curate.core.io import path_identity
from curate.core.records import LedgerEntry, ledger_table
from curate.core.stage import ShardInput, ShardOutput, ShardStage, cpu_workers
from curate.stages.budget.stage import cached_batch_tokenizer, text_ids_key
from curate.stages.budget.tiling import tokens_per_tile
from curate.stages.pack.config import PackConfig
from curate.stages.pack.store import TOKENS_ROW_GROUP_ROWS, compact

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
        ("line", pa.int64()),
        ("input_ids", pa.list_(pa.int32())),  # compact: without the image context runs
        ("labels", pa.list_(pa.int32())),
        ("context_at", pa.list_(pa.int32())),  # where each cut context run goes back
        ("context_len", pa.list_(pa.int32())),  # its length (256 per tile)
        ("n_tokens", pa.int32()),  # the full sequence's, context runs included
        ("n_supervised", pa.int32()),
        ("tiles", pa.int32()),
        ("n_images", pa.int16()),  # what packing reads, without the images' paths
        ("images", pa.list_(TOKEN_IMAGE_TYPE)),  # in token order (video: the sampled frames)
    ]
)


def chat_sample(sample: dict, budget: dict, *, system_prompt: str | None, per_tile: int):
    """The sample as the template tokeniser takes it: turns and its images' context counts at
    the budget's grids (video: the sampled frames)."""
    counts = [per_tile * (g["cols"] * g["rows"] + int(g["thumbnail"])) for g in budget["grids"]]
    return ChatSample(
        sample["conversations"],
        counts,
        system_prompt=system_prompt,
        n_video_frames=len(budget["frame_indices"]),
    )


def token_row(sample: dict, budget: dict, tokens: CompactIds, augment: bool) -> dict:
    """One sample's training row: ids and labels (compact when ``tokens`` is), counts and the
    images with their grids."""
    grids = budget["grids"]
    if sample["kind"] == "video":
        sources = [sample["images"][i] for i in budget["frame_indices"]]
    else:
        sources = sample["images"]
    images = [
        {"path": im["path"], **g, "data_augment": augment}
        for im, g in zip(sources, grids, strict=True)
    ]
    labels = np.asarray(tokens.labels, dtype=np.int32)
    return {
        "sample_id": sample["sample_id"],
        "dataset": sample["dataset"],
        "line": sample["line"],
        "input_ids": np.asarray(tokens.input_ids, dtype=np.int32),
        "labels": labels,
        "context_at": tokens.context_at,
        "context_len": tokens.context_len,
        "n_tokens": len(tokens.input_ids) + sum(tokens.context_len),
        # cut context runs are never trained: the compact labels hold every trained token
        "n_supervised": int(np.count_nonzero(labels != IGNORE_INDEX)),
        "tiles": sum(g["cols"] * g["rows"] + int(g["thumbnail"]) for g in grids),
        "n_images": len(images),
        "images": images,
    }


def tokenize_rows(
    samples: list[dict],
    budgets: dict[str, dict],
    tokenizer: BatchTokenizer,
    *,
    augment: dict[str, bool],
    system_prompt: str | None,
    per_tile: int = 256,
    compact_context: bool = False,
    chunk_samples: int = 2048,
) -> list[dict]:
    """Training rows of a shard's samples, ``chunk_samples`` tokenised at once. Compact (image
    context runs left out and recorded, ``curate.stages.pack.store``): built so by the batch
    tokeniser, or cut out of the full ids where it falls back to per-sample tokenising."""
    rows = []
    for start in range(0, len(samples), chunk_samples):
        chunk = samples[start : start + chunk_samples]
        chats = [
            chat_sample(s, budgets[s["sample_id"]], system_prompt=system_prompt, per_tile=per_tile)
            for s in chunk
        ]
        rows += [
            token_row(s, budgets[s["sample_id"]], tokens, augment[s["dataset"]])
            for s, tokens in zip(chunk, _tokens(tokenizer, chats, compact_context), strict=True)
        ]
    return rows


def _tokens(tokenizer: BatchTokenizer, chats: list[ChatSample], compact_context: bool):
    if compact_context:
        fast = tokenizer.compact(chats)
        if fast is not None:
            return fast
        context_id = tokenizer.tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
        return [CompactIds(*compact(ids, labels, context_id)) for ids, labels in tokenizer(chats)]
    return [CompactIds(ids, labels, [], []) for ids, labels in tokenizer(chats)]


CHUNK_ROWS = 4096
SAMPLE_COLUMNS = ["sample_id", "dataset", "line", "kind", "images"]


def rows_from_budget(
    samples: list[dict], budget: pa.Table, per_tile: int, augment: dict[str, bool]
) -> list[dict]:
    """Training rows from the budget's compact ids: each image slot gets 256·tiles context
    tokens at the grid the budget chose; the same rows ``tokenize_rows`` makes."""
    by_id = {s["sample_id"]: s for s in samples}
    rows = []
    for b in budget.to_pylist():
        tiles = [g["cols"] * g["rows"] + int(g["thumbnail"]) for g in b["grids"]]
        tokens = CompactIds(
            b["text_ids"], b["text_labels"], b["image_slots"], [per_tile * t for t in tiles]
        )
        sample = by_id[b["sample_id"]]
        rows.append(token_row(sample, b, tokens, augment[sample["dataset"]]))
    return rows


class TokenizeStage(ShardStage):
    """Training ids and labels of every budgeted sample (``tokens/``), at the budget's grids."""

    name = STAGE
    reads = ("ingest", "budget")
    row_group_rows = TOKENS_ROW_GROUP_ROWS  # the trainer reads single rows back

    def __init__(
        self,
        config: PackConfig,
        tokenizer: str | Path,
        image_size: int = 448,
        verify_images: bool = True,
        reuse_budget_ids: bool = True,
    ) -> None:
        super().__init__(config)
        self.tokenizer = str(Path(tokenizer).resolve())
        self.image_size = image_size
        self.verify_images = verify_images  # True when no filter stage decodes the pixels
        # The budget tokenised the same text: made with this tokenizer under this system
        # prompt (its rows' text_ids_key), its ids are these samples' ids; no text is
        # tokenised twice.
        self.reuse_budget_ids = reuse_budget_ids
        self.ids_key = ""
        self.workers = cpu_workers(config.workers)
        self.augment: dict[str, bool] = {}

    @property
    def table(self) -> str:
        return "tokens"

    def settings(self) -> dict:
        return {
            "system_prompt": self.config.system_prompt,
            "tokenizer": path_identity(self.tokenizer),
            "image_size": self.image_size,
            "verify_images": self.verify_images,
            "layout": "compact-2",  # rows of an earlier layout are redone
        }

    def extra_inputs(self, run: RunFolder) -> dict[str, str]:
        return {"data_augment": str(sorted(self._augment(run).items()))}

    def prepare(self, run: RunFolder) -> None:
        self.augment = self._augment(run)
        self.ids_key = text_ids_key(path_identity(self.tokenizer), self.config.system_prompt)

    @staticmethod
    def _augment(run: RunFolder) -> dict[str, bool]:
        return {name: bool(d["data_augment"]) for name, d in run.datasets().items()}

    def _budget_has_ids(self, budget: pa.Table) -> bool:
        # None: a budget made before it kept its ids, or with a tokenizer it could not batch;
        # another key: another tokenizer or system prompt than this stage's.
        if not self.reuse_budget_ids or "text_ids_key" not in budget.column_names:
            return False
        keys = budget.column("text_ids_key")
        return keys.null_count == 0 and bool(pc.all(pc.equal(keys, self.ids_key)).as_py())

    def process(self, shard: ShardInput) -> ShardOutput:
        budget, samples = shard.table("budget"), shard.table("samples")
        reuse = self._budget_has_ids(budget)
        if reuse:
            samples = samples.select(SAMPLE_COLUMNS)
        parts, entries, decoded = [TOKENS_SCHEMA.empty_table()], [], {}
        for start in range(0, samples.num_rows, CHUNK_ROWS):  # Python rows of a chunk at a time
            chunk = samples.slice(start, CHUNK_ROWS).to_pylist()
            rows = self._rows(chunk, _budget_rows(budget, chunk), reuse)
            bad = unreadable_entries(rows, decoded) if self.verify_images else []
            rejected = {e.sample_id for e in bad}
            rows = [r for r in rows if r["sample_id"] not in rejected]
            parts.append(pa.Table.from_pylist(rows, schema=TOKENS_SCHEMA))
            entries += bad
        return ShardOutput(pa.concat_tables(parts), ledger_table(entries))

    def _rows(self, samples: list[dict], budget: pa.Table, reuse: bool) -> list[dict]:
        per_tile = tokens_per_tile(self.image_size)
        if reuse:
            return rows_from_budget(samples, budget, per_tile, self.augment)
        return tokenize_rows(
            samples,
            {b["sample_id"]: b for b in budget.to_pylist()},
            cached_batch_tokenizer(self.tokenizer),
            augment=self.augment,
            system_prompt=self.config.system_prompt,
            per_tile=per_tile,
            compact_context=True,
        )


def _budget_rows(budget: pa.Table, samples: list[dict]) -> pa.Table:
    """The budget rows of these samples."""
    ids = pa.array([s["sample_id"] for s in samples])
    return budget.filter(pc.is_in(budget.column("sample_id"), value_set=ids))


def unreadable_entries(rows: list[dict], errors: dict[str, str] | None = None) -> list[LedgerEntry]:
    """``image_unreadable`` rejections of the rows whose images (or frames) cannot be decoded;
    each file is decoded once however many samples use it (``errors``: path -> error, "" when
    it decodes, shared across calls so a shard's chunks decode a file once)."""
    errors = {} if errors is None else errors
    entries = []
    for r in rows:
        bad = []
        for im in r["images"]:
            if im["path"] not in errors:
                errors[im["path"]] = decode_error(im["path"])
            if errors[im["path"]]:
                bad.append(errors[im["path"]])
        if bad:
            detail = "cannot decode " + "; ".join(dict.fromkeys(bad))
            entries.append(
                LedgerEntry(
                    r["sample_id"],
                    r["dataset"],
                    r["line"],
                    STAGE,
                    "image_unreadable",
                    value=float(len(bad)),
                    threshold=0.0,
                    detail=detail,
                )
            )
    return entries
