"""The pack stage: kept samples (times their copies) -> padding-free packs -> the manifest.

1. tokenise every budgeted shard (resumable, ``tokens/``);
2. take the samples whose status is ``keep`` (ledgers + review decisions, ``curate.review``);
3. reject (or truncate) samples over a cap, to ``ledger/pack`` with their sizes;
4. bin-pack the copies under both caps, shuffle the pack order with the seed;
5. write ``packs/part-*.parquet`` (PACK_SCHEMA) into a new folder and swap it into place.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from curate.chat import IMG_END, IMG_START
from curate.io import write_json_atomic, write_parquet_atomic
from curate.pack.binpack import lower_bound, pack_lengths
from curate.pack.config import PackConfig
from curate.pack.internvl_packer import internvl_greedy_pack
from curate.pack.manifest import PACK_IMAGE_TYPE, PACK_SCHEMA
from curate.pack.tokenize import TOKENS_SCHEMA, run_tokenize
from curate.records import LedgerEntry, ledger_table
from curate.review import sample_status

STAGE = "pack"


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


def _eligible_tokens(run, cfg: PackConfig) -> tuple[pa.Table, pl.DataFrame]:
    status = sample_status(run, cfg.flagged)
    keep = status.filter(pl.col("status") == "keep").select("sample_id")
    tokens = run.read("tokens", schema=TOKENS_SCHEMA)
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
                -1,
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
    return fits, entries, len(truncated)


def _expand_copies(run, fits: pa.Table) -> tuple[np.ndarray, int]:
    """Row index of every copy (a sample with 3 copies appears 3 times), and how many
    samples have no copy at all."""
    copies = pl.read_parquet(run.path / "repeat" / "copies.parquet").select("sample_id", "copies")
    ids = pl.from_arrow(fits.select(["sample_id"])).with_row_index("row")
    joined = ids.join(copies, on="sample_id", how="left").sort("row")
    n = joined["copies"].fill_null(1).to_numpy().astype(np.int64)
    return np.repeat(joined["row"].to_numpy(), n), int((n == 0).sum())


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


def _write_packs(run, manifest: pa.Table, packs_per_shard: int) -> None:
    """Write all manifest shards into a fresh folder, then swap it in for the old one."""
    final = run.path / "packs"
    staging = run.path / ".packs.new"
    shutil.rmtree(staging, ignore_errors=True)
    for k, start in enumerate(range(0, max(len(manifest), 1), packs_per_shard)):
        write_parquet_atomic(
            manifest.slice(start, packs_per_shard), staging / f"part-{k:05d}.parquet"
        )
    old = run.path / ".packs.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def run_pack(
    run, cfg: PackConfig, tokenizer: str | Path, image_size: int = 448, on_shard=None
) -> PackReport:
    """Tokenise (resumable), select, cap, pack and write the manifest; returns the report."""
    from curate.budget.stage import cached_tokenizer

    run_tokenize(run, cfg, tokenizer, image_size=image_size, on_shard=on_shard)
    tok = cached_tokenizer(str(tokenizer))
    special = (tok.convert_tokens_to_ids(IMG_START), tok.convert_tokens_to_ids(IMG_END))
    eligible, status = _eligible_tokens(run, cfg)
    fits, entries, n_truncated = _apply_caps(eligible, cfg, special)
    rows, not_drawn = _expand_copies(run, fits)
    copies = fits.take(pa.array(rows))
    n_tok = copies.column("n_tokens").to_numpy().astype(np.int64)
    n_til = copies.column("tiles").to_numpy().astype(np.int64)
    packs = assign_packs(n_tok, n_til, cfg)
    manifest = build_manifest(copies, packs)
    _write_packs(run, manifest, cfg.packs_per_shard)
    write_parquet_atomic(_with_lines(run, ledger_table(entries)), run.ledger_path(STAGE, "all"))
    report = _report(cfg, status, eligible, entries, n_truncated, not_drawn, n_tok, n_til, packs)
    write_json_atomic(asdict(report), run.stats_path(STAGE))
    return report


def _with_lines(run, ledger: pa.Table) -> pa.Table:
    """Fill the annotation line of each ledger row (the token rows do not carry it)."""
    if ledger.num_rows == 0:
        return ledger
    lines = pl.from_arrow(run.read("samples").select(["sample_id", "line"]))
    df = pl.from_arrow(ledger).drop("line").join(lines, on="sample_id", how="left")
    return df.select(ledger.schema.names).to_arrow().cast(ledger.schema)


def _report(
    cfg, status, eligible, entries, n_truncated, not_drawn, n_tok, n_til, packs
) -> PackReport:
    n_packs = len(packs)
    lb = int(lower_bound(n_tok, n_til, max_tokens=cfg.max_tokens, max_tiles=cfg.max_tiles))
    batch = max(1, round(len(n_tok) / max(n_packs, 1)))
    padded = padded_cost(n_tok, batch, cfg.seed) if len(n_tok) else 0
    excluded = dict(status.filter(pl.col("status") != "keep").group_by("status").len().iter_rows())
    return PackReport(
        samples_in=len(eligible),
        samples_packed=len(eligible) - len(entries) - not_drawn,
        samples_not_drawn=not_drawn,
        samples_rejected=len(entries),
        samples_truncated=n_truncated,
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
    )
