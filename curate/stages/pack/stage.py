"""The pack stage: kept samples (times their copies) -> padding-free packs -> the manifest.

After the tokenize stage (``tokens/``, one row per sample):

1. take the samples whose status is ``keep``: the ledgers of the stages before pack and the
   review decisions (``curate.core.status``), never pack's own earlier output;
2. reject (or truncate) samples over a cap, to ``ledger/pack`` with their sizes;
3. bin-pack the copies under both caps, shuffle the pack order with the seed;
4. write ``packs/part-*.parquet`` (REF_PACK_SCHEMA: samples by tokens shard and row, their
   sizes; never their ids); the engine swaps the folder into place.

It holds a few numbers per sample, never the samples' ids: those stay in ``tokens/``.

Its rows (``pack/all.parquet``) say how many copies of each kept sample were packed.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import orjson
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from curate.core.chat import IMG_CONTEXT, IMG_END, IMG_START
from curate.core.folder import RunFolder
from curate.core.io import file_hash, write_parquet_atomic
from curate.core.records import LedgerEntry, ledger_table
from curate.core.stage import GlobalInput, GlobalOutput, GlobalStage
from curate.core.status import decisions_path
from curate.stages.budget.stage import cached_tokenizer
from curate.stages.pack.balance import COST_MODELS, balanced_order, pack_shapes, step_imbalance
from curate.stages.pack.binpack import lower_bound, pack_lengths
from curate.stages.pack.bounds import REPORT_LP_ABOVE_GAP, REPORT_LP_TIME_LIMIT_S, best_bound
from curate.stages.pack.config import PackConfig
from curate.stages.pack.internvl_packer import internvl_greedy_pack
from curate.stages.pack.manifest import (
    REF_PACK_SCHEMA,
    TOKENS_FOLDER_KEY,
    TOKENS_IDENTITY_KEY,
)
from curate.stages.pack.store import TokenStore, expand
from curate.stages.pack.tokenize import TOKENS_SCHEMA

STAGE = "pack"
BALANCE_REPORT_RANKS = (8, 64)


@dataclass
class PackReport:
    samples_in: int  # samples whose status is keep = packed + not drawn + rejected
    samples_packed: int  # in at least one pack
    samples_not_drawn: int  # kept, but 0 copies under the repeat factor (r < 1)
    samples_rejected: int  # over a cap
    samples_truncated: int
    samples_excluded: dict[str, int]  # status reject / flag (awaiting review): not packed
    copies_packed: int
    packs: int
    lower_bound: int
    ratio_to_lower_bound: float
    token_fill: float  # packed tokens / (packs · C)
    tile_fill: float
    tokens: int
    tiles: int
    padded_batch_tokens: int  # the same samples in padded batches of the same size
    padding_fraction_padded: float
    algorithm: str
    # The certificate (curate.stages.pack.bounds): the best proven lower bound on the packs any
    # packing needs, which bound it is (simple, tile LP, 2-D LP) and the gap packs / bound - 1.
    best_bound: int = 0
    best_bound_kind: str = "simple"
    gap_to_best_bound: float = 0.0
    # the 2-D LP bound (None: not run, the cheaper bounds already prove a gap of ≤ 0.5%)
    lp_bound: int | None = None
    # False: stopped early at the time box (still valid). No seconds here: reports compare equal.
    lp_bound_converged: bool | None = None
    # Per rank count: step imbalance (max / mean pack cost of the packs side by side), mean and
    # worst over the steps, for the shuffled order and the balanced one.
    rank_balance: dict = field(default_factory=dict)


# What packing needs of a sample: a few numbers, never its ids (those stay in tokens/).
SIZE_COLUMNS = ["sample_id", "dataset", "line", "n_tokens", "n_supervised", "tiles", "n_images"]


def _token_sizes(run: RunFolder) -> pl.DataFrame:
    """Every tokens/ row's sizes, shard and row, one shard at a time (never its ids)."""
    frames = [
        pl.read_parquet(run.shard_path("tokens", shard), columns=SIZE_COLUMNS).with_columns(
            shard=pl.lit(shard), row=pl.int_range(pl.len(), dtype=pl.Int32)
        )
        for shard in run.shards("tokens")
    ]
    if not frames:
        empty = pl.from_arrow(TOKENS_SCHEMA.empty_table().select(SIZE_COLUMNS))
        return empty.with_columns(shard=pl.lit("", pl.String), row=pl.lit(0, pl.Int32))
    return pl.concat(frames)


def _eligible_tokens(inp: GlobalInput) -> tuple[pl.DataFrame, pl.DataFrame]:
    status = inp.status()
    keep = status.filter(pl.col("status") == "keep").select("sample_id")
    sizes = _token_sizes(inp.run).join(keep, on="sample_id", how="semi")
    return sizes.sort("shard", "row"), status


def truncate_row(row: dict, max_tokens: int, img_start: int, img_end: int) -> dict | None:
    """Cut a sample's text at ``max_tokens``, never inside an image; None if nothing trains."""
    ids = row["input_ids"]
    cut, depth, image_no = max_tokens, 0, 0
    starts = []
    for pos, t in enumerate(ids[:max_tokens]):
        if t == img_start:
            starts.append(pos)
            depth = 1
        elif t == img_end:
            depth = 0
            image_no += 1
    if depth:  # the cut falls inside an image: cut before that image starts
        cut = starts[-1]
    labels = row["labels"][:cut]
    supervised = sum(1 for x in labels if x != -100)
    if supervised == 0:
        return None
    images = row["images"][:image_no]
    tiles = sum(im["cols"] * im["rows"] + int(im["thumbnail"]) for im in images)
    return {
        **row,
        "input_ids": ids[:cut],
        "labels": labels,
        "n_tokens": cut,
        "n_supervised": supervised,
        "tiles": tiles,
        "images": images,
    }


def _truncated_sizes(store: TokenStore, sizes: dict, max_tokens: int, special) -> dict | None:
    """A sample over the token cap, cut as ``truncate_row`` does, read from the tokens store."""
    stored = store.row(sizes["shard"], sizes["row"])
    ids, labels = expand(
        stored["input_ids"],
        stored["labels"],
        stored["context_at"],
        stored["context_len"],
        special.context,
    )
    row = {"input_ids": ids.tolist(), "labels": labels.tolist(), "images": stored["images"]}
    cut = truncate_row(row, max_tokens, special.start, special.end)
    if cut is None:
        return None
    return {
        **sizes,
        "n_tokens": cut["n_tokens"],
        "n_supervised": cut["n_supervised"],
        "tiles": cut["tiles"],
        "n_images": len(cut["images"]),
    }


def _over_cap_entry(row: dict, cfg: PackConfig) -> LedgerEntry:
    n_tok, n_til = row["n_tokens"], row["tiles"]
    rule, value, cap = (
        ("over_tile_cap", n_til, cfg.max_tiles)
        if n_til > cfg.max_tiles
        else ("over_token_cap", n_tok, cfg.max_tokens)
    )
    return LedgerEntry(
        row["sample_id"],
        row["dataset"],
        row["line"],
        STAGE,
        rule,
        "reject",
        float(value),
        float(cap),
        f"{n_tok} tokens, {n_til} tiles; caps {cfg.max_tokens} tokens, {cfg.max_tiles} tiles",
    )


def _apply_caps(run: RunFolder, sizes: pl.DataFrame, cfg: PackConfig, tokenizer: str | Path):
    """The rows that fit (truncated ones with their cut sizes, in place) and ledger entries for
    the rest. The tokenizer is loaded only to truncate (packing itself needs no ids)."""
    over = (pl.col("n_tokens") > cfg.max_tokens) | (pl.col("tiles") > cfg.max_tiles)
    sizes = sizes.with_row_index("_i")
    entries, cut_rows = [], []
    store = TokenStore(run.path / "tokens")  # opened once; its row groups are kept
    for row in sizes.filter(over).iter_rows(named=True):
        if cfg.over_cap == "truncate" and row["tiles"] <= cfg.max_tiles:
            cut = _truncated_sizes(store, row, cfg.max_tokens, _special_ids(tokenizer))
            if cut is not None:
                cut_rows.append(cut)
                continue
        entries.append(_over_cap_entry(row, cfg))
    fits = sizes.filter(~over)
    if cut_rows:
        fits = pl.concat([fits, pl.DataFrame(cut_rows, schema=sizes.schema)]).sort("_i")
    return fits.drop("_i"), entries, {r["sample_id"] for r in cut_rows}


def _expand_copies(run: RunFolder, fits: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Row index of every copy (a sample with 3 copies appears 3 times), and each row's
    number of copies."""
    path = run.path / "repeat" / "copies.parquet"
    copies = pl.read_parquet(path).select("sample_id", "copies")
    ids = fits.select("sample_id").with_row_index("row")
    joined = ids.join(copies, on="sample_id", how="left").sort("row")
    n = joined["copies"].fill_null(1).to_numpy().astype(np.int64)
    return np.repeat(joined["row"].to_numpy(), n), n


def assign_packs(tok: np.ndarray, til: np.ndarray, cfg: PackConfig) -> list[list[int]]:
    """Packs in training order: a seeded shuffle (pack_lengths shuffles its own output)."""
    if cfg.algorithm == "internvl":
        packs = internvl_greedy_pack(
            tok,
            til,
            max_tokens=cfg.max_tokens,
            max_tiles=cfg.max_tiles,
            max_buffer_size=cfg.internvl_buffer_size,
        )
        return [packs[i] for i in np.random.default_rng(cfg.seed).permutation(len(packs))]
    return pack_lengths(tok, til, max_tokens=cfg.max_tokens, max_tiles=cfg.max_tiles, seed=cfg.seed)


def _regroup(values: pa.Array, counts: np.ndarray) -> pa.ListArray:
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), values)


def build_manifest(copies: pl.DataFrame, packs: list[list[int]], costs: np.ndarray) -> pa.Table:
    """One reference-manifest row per pack (``packs`` index the rows of ``copies``): each
    sample named by its tokens shard and row, with its sizes; vectorised, no loop over samples.
    """
    flat = np.fromiter((i for p in packs for i in p), dtype=np.int64)
    per_pack = np.array([len(p) for p in packs], dtype=np.int64)
    taken = copies[flat] if len(flat) else copies.clear()
    pack_of = np.repeat(np.arange(len(packs)), per_pack)

    def per_pack_sum(col: str) -> pa.Array:
        total = np.bincount(pack_of, weights=taken[col].to_numpy(), minlength=len(packs))
        return pa.array(total.astype(np.int32))

    def listed(col: str, dtype: pa.DataType) -> pa.ListArray:
        return _regroup(taken[col].to_arrow().cast(dtype), per_pack)

    columns = {
        "pack_id": pa.array(np.arange(len(packs), dtype=np.int64)),
        "sample_ids": listed("sample_id", pa.string()),
        "token_shards": listed("shard", pa.string()),
        "token_rows": listed("row", pa.int32()),
        "seq_lens": listed("n_tokens", pa.int32()),
        "supervised": listed("n_supervised", pa.int32()),
        "image_counts": listed("n_images", pa.int16()),
        "n_tokens": per_pack_sum("n_tokens"),
        "n_tiles": per_pack_sum("tiles"),
        "cost_flops": pa.array(np.asarray(costs, dtype=np.float64)),
    }
    return pa.table(columns, schema=REF_PACK_SCHEMA)


def padded_cost(tok: np.ndarray, batch_size: int, seed: int) -> int:
    """Tokens a padded batch (shuffled samples, padded to the longest in batch) would process."""
    shuffled = np.random.default_rng(seed).permutation(tok)
    total = 0
    for start in range(0, len(shuffled), batch_size):
        batch = shuffled[start : start + batch_size]
        total += int(batch.max()) * len(batch)
    return total


def tokens_identity(run: RunFolder) -> str:
    """Digest of the tokens shards' outputs: a manifest that names it changes (and so does
    training's input) when the tokens it refers to do, even if its own rows do not."""
    outputs = {shard: m.get("output") for shard, m in run.markers("tokenize").items()}
    return xxhash.xxh3_64_hexdigest(orjson.dumps(outputs, option=orjson.OPT_SORT_KEYS))


def _write_packs(out: Path, manifest: pa.Table, packs_per_shard: int, tokens: str) -> None:
    """Write the manifest shards into ``out/packs`` (the engine swaps it in when done); each
    says where its tokens are, relative to its folder, and which tokens they are."""
    manifest = manifest.replace_schema_metadata(
        {TOKENS_FOLDER_KEY: b"../tokens", TOKENS_IDENTITY_KEY: tokens.encode()}
    )
    for k, start in enumerate(range(0, max(len(manifest), 1), packs_per_shard)):
        write_parquet_atomic(
            manifest.slice(start, packs_per_shard), out / "packs" / f"part-{k:05d}.parquet"
        )


OUTCOME_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("dataset", pa.string()),
        ("line", pa.int64()),
        ("copies", pa.int32()),  # copies packed (0: not drawn under a repeat factor < 1)
        ("truncated", pa.bool_()),
    ]
)


def _outcomes(fits: pl.DataFrame, copies_of: np.ndarray, truncated_ids: set[str]) -> pa.Table:
    out = fits.select(
        "sample_id",
        "dataset",
        "line",
        copies=pl.Series(copies_of.astype(np.int32)),
        truncated=pl.col("sample_id").is_in(list(truncated_ids)),
    )
    return out.to_arrow().cast(OUTCOME_SCHEMA)


class PackStage(GlobalStage):
    """Kept samples, times their copies, bin-packed into the manifest ``packs/``."""

    name = STAGE
    reads = ("tokenize", "repeat")
    outputs = ("packs",)
    speed_fields = frozenset({"workers"})

    def __init__(
        self,
        config: PackConfig,
        tokenizer: str | Path,
        respects: tuple[str, ...] = ("filter", "score"),
        requires: tuple[str, ...] = (),
    ) -> None:
        super().__init__(config)
        self.tokenizer = str(Path(tokenizer).resolve())
        # tokenize rejects samples whose images cannot be decoded: never packed, whatever else
        self.respects = tuple(dict.fromkeys((*respects, "tokenize")))
        self.requires = requires
        self.flagged = config.flagged

    def settings(self) -> dict:
        # system_prompt is the tokenize stage's setting: its output is pack's input.
        return self.config.model_dump(mode="json", exclude={"workers", "system_prompt"})

    def extra_inputs(self, run: RunFolder) -> dict[str, str]:
        path = decisions_path(run)
        return {"review": file_hash(path) if path.exists() else ""}

    def run(self, inp: GlobalInput) -> GlobalOutput:
        report, outcomes, entries = run_pack(inp, self.config, self.tokenizer)
        return GlobalOutput(outcomes, ledger_table(entries), asdict(report))


def run_pack(inp: GlobalInput, cfg: PackConfig, tokenizer: str | Path):
    """Select, cap, pack and write the manifest; returns the report, outcomes and ledger."""
    eligible, status = _eligible_tokens(inp)
    fits, entries, truncated_ids = _apply_caps(inp.run, eligible, cfg, tokenizer)
    rows, copies_of = _expand_copies(inp.run, fits)
    copies = fits[rows] if len(rows) else fits.clear()
    n_tok = copies["n_tokens"].to_numpy().astype(np.int64)
    n_til = copies["tiles"].to_numpy().astype(np.int64)
    packs = assign_packs(n_tok, n_til, cfg)
    costs = COST_MODELS[cfg.cost_model].pack_costs(*pack_shapes(packs, n_tok, n_til))
    balance = rank_balance(costs, cfg.seed)
    if cfg.balance_ranks:
        order = balanced_order(costs, cfg.balance_ranks, cfg.seed)
        packs, costs = [packs[i] for i in order], costs[order]
    manifest = build_manifest(copies, packs, costs)
    _write_packs(inp.out, manifest, cfg.packs_per_shard, tokens_identity(inp.run))
    packed = _packed_samples(manifest)
    report = _report(cfg, status, eligible, entries, truncated_ids, packed, n_tok, n_til, packs)
    report.rank_balance = balance
    return report, _outcomes(fits, copies_of, truncated_ids), entries


@dataclass(frozen=True)
class SpecialIds:
    start: int  # <img>
    end: int  # </img>
    context: int  # <IMG_CONTEXT>


@functools.cache
def _special_ids(tokenizer: str | Path) -> SpecialIds:
    tok = cached_tokenizer(str(tokenizer))
    return SpecialIds(*(tok.convert_tokens_to_ids(t) for t in (IMG_START, IMG_END, IMG_CONTEXT)))


def rank_balance(costs: np.ndarray, seed: int) -> dict[str, dict[str, dict[str, float]]]:
    """Step imbalance (max / mean pack cost of a step) on 8 and 64 ranks: the shuffled order
    and the balanced one (``balance_ranks``), so a user sees what balancing would give."""
    return {
        str(n): {
            "shuffled": step_imbalance(costs, n),
            "balanced": step_imbalance(costs[balanced_order(costs, n, seed)], n),
        }
        for n in BALANCE_REPORT_RANKS
    }


def _packed_samples(manifest: pa.Table) -> int:
    """Distinct samples in the manifest (counted there, not derived)."""
    ids = pc.list_flatten(manifest.column("sample_ids").combine_chunks())
    return len(pc.unique(ids))


def _report(
    cfg, status, eligible, entries, truncated_ids, packed, n_tok, n_til, packs
) -> PackReport:
    n_packs = len(packs)
    lb = int(lower_bound(n_tok, n_til, max_tokens=cfg.max_tokens, max_tiles=cfg.max_tiles))
    batch = max(1, round(len(n_tok) / max(n_packs, 1)))
    padded = padded_cost(n_tok, batch, cfg.seed) if len(n_tok) else 0
    excluded = dict(status.filter(pl.col("status") != "keep").group_by("status").len().iter_rows())
    cert = best_bound(
        n_packs,
        n_tok,
        n_til,
        max_tokens=cfg.max_tokens,
        max_tiles=cfg.max_tiles,
        time_limit_s=REPORT_LP_TIME_LIMIT_S,
        packing=packs,
        lp_above_gap=REPORT_LP_ABOVE_GAP,
    )
    return PackReport(
        samples_in=len(eligible),
        samples_packed=packed,
        samples_not_drawn=len(eligible) - len(entries) - packed,
        samples_rejected=len(entries),
        samples_truncated=len(truncated_ids),
        samples_excluded=excluded,
        copies_packed=len(n_tok),
        packs=n_packs,
        lower_bound=lb,
        ratio_to_lower_bound=round(n_packs / lb, 5) if lb else 1.0,
        token_fill=round(float(n_tok.sum()) / max(n_packs * cfg.max_tokens, 1), 5),
        tile_fill=round(float(n_til.sum()) / max(n_packs * cfg.max_tiles, 1), 5),
        tokens=int(n_tok.sum()),
        tiles=int(n_til.sum()),
        padded_batch_tokens=padded,
        padding_fraction_padded=round(float(1 - n_tok.sum() / padded), 5) if padded else 0.0,
        algorithm=cfg.algorithm,
        best_bound=cert.bound,
        best_bound_kind=cert.kind,
        gap_to_best_bound=round(cert.gap, 5),
        lp_bound=cert.lp.bound if cert.lp else None,
        lp_bound_converged=cert.lp.converged if cert.lp else None,
    )
