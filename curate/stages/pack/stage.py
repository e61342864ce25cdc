"""The pack stage: kept samples (times their copies) -> padding-free packs -> the manifest.

After the tokenize stage (``tokens/``, one row per sample):

1. take the samples whose status is ``keep``: the ledgers of the stages before pack and the
   review decisions (``curate.core.status``), never pack's own earlier output;
2. reject (or truncate) samples over a cap, to ``ledger/pack`` with their sizes;
3. bin-pack the copies under both caps, shuffle the pack order with the seed;
4. write ``packs/part-*.parquet`` (PACK_SCHEMA); the engine swaps the folder into place.

Its rows (``pack/all.parquet``) say how many copies of each kept sample were packed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from curate.core.chat import IMG_END, IMG_START
from curate.core.folder import RunFolder
from curate.core.io import file_hash, write_parquet_atomic
from curate.core.records import LedgerEntry, ledger_table
from curate.core.stage import GlobalInput, GlobalOutput, GlobalStage
from curate.core.status import decisions_path
from curate.stages.budget.stage import cached_tokenizer
from curate.stages.pack.balance import COST_MODELS, balanced_order, pack_shapes, step_imbalance
from curate.stages.pack.binpack import lower_bound, pack_lengths
from curate.stages.pack.bounds import REPORT_LP_TIME_LIMIT_S, best_bound
from curate.stages.pack.config import PackConfig
from curate.stages.pack.internvl_packer import internvl_greedy_pack
from curate.stages.pack.manifest import PACK_IMAGE_TYPE, PACK_SCHEMA
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
    lp_bound: int | None = None  # the 2-D LP bound (None: not run, the others already meet packs)
    # False: stopped early at the time box (still valid). No seconds here: reports compare equal.
    lp_bound_converged: bool | None = None
    # Per rank count: step imbalance (max / mean pack cost of the packs side by side), mean and
    # worst over the steps, for the shuffled order and the balanced one.
    rank_balance: dict = field(default_factory=dict)


def _eligible_tokens(inp: GlobalInput) -> tuple[pa.Table, pl.DataFrame]:
    status = inp.status()
    keep = status.filter(pl.col("status") == "keep").select("sample_id")
    tokens = inp.run.read("tokens", schema=TOKENS_SCHEMA)
    ids = pl.from_arrow(tokens.select(["sample_id"])).with_row_index("row")
    rows = ids.join(keep, on="sample_id", how="semi")["row"].to_numpy()
    return tokens.take(pa.array(np.sort(rows))), status


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


def _apply_caps(tokens: pa.Table, cfg: PackConfig, tokenizer_ids: tuple[int, int]):
    """Split rows into those that fit (truncated ones rebuilt) and ledger entries for the rest."""
    n_tok = tokens.column("n_tokens").to_numpy()
    n_til = tokens.column("tiles").to_numpy()
    over = (n_tok > cfg.max_tokens) | (n_til > cfg.max_tiles)
    entries, truncated = [], []
    for i in np.nonzero(over)[0]:
        row = tokens.slice(int(i), 1).to_pylist()[0]
        if cfg.over_cap == "truncate" and n_til[i] <= cfg.max_tiles:
            cut = truncate_row(row, cfg.max_tokens, *tokenizer_ids)
            if cut is not None:
                truncated.append(cut)
                continue
        rule, value, cap = (
            ("over_tile_cap", n_til[i], cfg.max_tiles)
            if n_til[i] > cfg.max_tiles
            else ("over_token_cap", n_tok[i], cfg.max_tokens)
        )
        entries.append(
            LedgerEntry(
                row["sample_id"],
                row["dataset"],
                row["line"],
                STAGE,
                rule,
                "reject",
                float(value),
                float(cap),
                f"{n_tok[i]} tokens, {n_til[i]} tiles; caps {cfg.max_tokens} "
                f"tokens, {cfg.max_tiles} tiles",
            )
        )
    fits = tokens.filter(pa.array(~over))
    if truncated:
        fits = pa.concat_tables([fits, pa.Table.from_pylist(truncated, schema=TOKENS_SCHEMA)])
    return fits, entries, {r["sample_id"] for r in truncated}


def _expand_copies(run: RunFolder, fits: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Row index of every copy (a sample with 3 copies appears 3 times), and each row's
    number of copies."""
    path = run.path / "repeat" / "copies.parquet"
    copies = pl.read_parquet(path).select("sample_id", "copies")
    ids = pl.from_arrow(fits.select(["sample_id"])).with_row_index("row")
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


def build_manifest(rows: pa.Table, packs: list[list[int]]) -> pa.Table:
    """One manifest row per pack from the tokenised rows (``packs`` index ``rows``).

    Vectorised: rows are taken in pack order once, then every list column is regrouped by
    offsets, so a million samples take seconds, not a Python loop over tokens.
    """
    flat = np.fromiter((i for p in packs for i in p), dtype=np.int64)
    per_pack = np.array([len(p) for p in packs], dtype=np.int64)
    taken = rows.take(pa.array(flat))
    tok = taken.column("n_tokens").to_numpy()
    pack_of = np.repeat(np.arange(len(packs)), per_pack)
    tokens_per_pack = np.bincount(pack_of, weights=tok, minlength=len(packs)).astype(np.int64)
    tiles_per_pack = np.bincount(
        pack_of, weights=taken.column("tiles").to_numpy(), minlength=len(packs)
    ).astype(np.int64)
    images = taken.column("images").combine_chunks()
    imgs_per_sample = pc.list_value_length(images).to_numpy(zero_copy_only=False)
    first_of_pack = np.concatenate([[0], np.cumsum(per_pack)[:-1]])
    index_in_pack = np.arange(len(flat)) - np.repeat(first_of_pack, per_pack)
    flat_images = pc.list_flatten(images)
    image_table = pa.StructArray.from_arrays(
        [
            pa.array(np.repeat(index_in_pack, imgs_per_sample).astype(np.int32)),
            *(flat_images.field(f) for f in ("path", "cols", "rows", "thumbnail", "data_augment")),
        ],
        fields=list(PACK_IMAGE_TYPE),
    )
    imgs_per_pack = np.bincount(pack_of, weights=imgs_per_sample, minlength=len(packs))
    columns = {
        "pack_id": pa.array(np.arange(len(packs), dtype=np.int64)),
        "sample_ids": _regroup(taken.column("sample_id").combine_chunks(), per_pack),
        "input_ids": _regroup(
            pc.list_flatten(taken.column("input_ids").combine_chunks()), tokens_per_pack
        ),
        "labels": _regroup(
            pc.list_flatten(taken.column("labels").combine_chunks()), tokens_per_pack
        ),
        "seq_lens": _regroup(pa.array(tok.astype(np.int32)), per_pack),
        "supervised": _regroup(taken.column("n_supervised").combine_chunks(), per_pack),
        "images": _regroup(image_table, imgs_per_pack.astype(np.int64)),
        "n_tokens": pa.array(tokens_per_pack.astype(np.int32)),
        "n_tiles": pa.array(tiles_per_pack.astype(np.int32)),
    }
    return pa.table(columns, schema=PACK_SCHEMA)


def padded_cost(tok: np.ndarray, batch_size: int, seed: int) -> int:
    """Tokens a padded batch (shuffled samples, padded to the longest in batch) would process."""
    shuffled = np.random.default_rng(seed).permutation(tok)
    total = 0
    for start in range(0, len(shuffled), batch_size):
        batch = shuffled[start : start + batch_size]
        total += int(batch.max()) * len(batch)
    return total


def _write_packs(out: Path, manifest: pa.Table, packs_per_shard: int) -> None:
    """Write the manifest shards into ``out/packs`` (the engine swaps it in when done)."""
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


def _outcomes(fits: pa.Table, copies_of: np.ndarray, truncated_ids: set[str]) -> pa.Table:
    ids = fits.column("sample_id").to_pylist()
    return pa.table(
        {
            "sample_id": ids,
            "dataset": fits.column("dataset"),
            "line": fits.column("line"),
            "copies": pa.array(copies_of.astype(np.int32)),
            "truncated": [i in truncated_ids for i in ids],
        },
        schema=OUTCOME_SCHEMA,
    )


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
    tok = cached_tokenizer(str(tokenizer))
    special = (tok.convert_tokens_to_ids(IMG_START), tok.convert_tokens_to_ids(IMG_END))
    eligible, status = _eligible_tokens(inp)
    fits, entries, truncated_ids = _apply_caps(eligible, cfg, special)
    rows, copies_of = _expand_copies(inp.run, fits)
    copies = fits.take(pa.array(rows))
    n_tok = copies.column("n_tokens").to_numpy().astype(np.int64)
    n_til = copies.column("tiles").to_numpy().astype(np.int64)
    packs = assign_packs(n_tok, n_til, cfg)
    costs = COST_MODELS[cfg.cost_model].pack_costs(*pack_shapes(packs, n_tok, n_til))
    balance = rank_balance(costs, cfg.seed)
    if cfg.balance_ranks:
        order = balanced_order(costs, cfg.balance_ranks, cfg.seed)
        packs, costs = [packs[i] for i in order], costs[order]
    manifest = build_manifest(copies, packs).append_column("cost_flops", pa.array(costs))
    _write_packs(inp.out, manifest, cfg.packs_per_shard)
    packed = _packed_samples(manifest)
    report = _report(cfg, status, eligible, entries, truncated_ids, packed, n_tok, n_til, packs)
    report.rank_balance = balance
    return report, _outcomes(fits, copies_of, truncated_ids), entries


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
