"""Pack manifests (``packs/*.parquet``) → training micro-batches.

A reference manifest (what ``curate pack`` writes) names each sample's ``tokens/`` row; the
ids are read from the tokens store and their image context runs put back here. An inline
manifest (PACK_SCHEMA) carries them.

Each image's tiles are rebuilt exactly from the grid recorded in the manifest with the budget's
``crop_tiles`` (same resize, row-major crops, thumbnail last), so the tile count matches the
``<IMG_CONTEXT>`` count the pack stage tokenised. Images of a ``data_augment`` dataset get
InternVL's random JPEG re-compression per tile (thumbnail included), quality uniform in 75..100.
Then ImageNet normalisation.

Order and randomness: an optimizer step takes ``batch_packs · accum · world`` consecutive
slots of an endless stream of packs (epoch 0 in ``pack_id`` order, the manifest's seed-shuffled
training order; later epochs permuted by seed+epoch); rank r's micro-step a takes its slice.
A pack's augmentation draws from its own RNG seeded by (seed, pack_id, epoch), so batches are
the same whatever the worker count, and a resumed run picks up at a step number. The loss
weight sum of the whole optimizer step is computed here from the manifest, so the loss does not
depend on how packs are split over accumulation steps and ranks (``loss.py``).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from curate.core.chat import IGNORE_INDEX
from curate.core.io import read_parquet_files
from curate.stages.budget.tiling import crop_tiles
from curate.stages.pack.manifest import (
    PACK_SCHEMA,
    REF_PACK_SCHEMA,
    TOKENS_FOLDER_KEY,
    is_reference,
    tiles_of,
)
from curate.stages.pack.store import TokenStore, resolve_pack

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
JPEG_QUALITIES = (75, 100)  # inclusive range InternVL draws from (simulate_jpeg_degradation)
LOSS_REDUCTIONS = ("token", "sample", "square")


def read_packs(packs_dir: str | Path) -> pa.Table:
    """All pack shards of a folder, sorted by pack_id (which must be unique).

    A reference manifest (what ``curate pack`` writes) comes back with its tokens folder,
    resolved, in the table's schema metadata; :class:`PackBatches` reads the ids from there.
    """
    files = sorted(p for p in Path(packs_dir).glob("*.parquet") if not p.name.startswith("."))
    if not files:
        raise FileNotFoundError(f"no pack shards (*.parquet) in {packs_dir}")
    first = pq.read_schema(files[0])
    schema = REF_PACK_SCHEMA.remove(REF_PACK_SCHEMA.get_field_index("cost_flops"))
    if not is_reference(first):
        schema = PACK_SCHEMA
    table = read_parquet_files(files).select(schema.names).cast(schema)
    table = table.sort_by("pack_id")
    ids = table.column("pack_id").to_numpy()
    if len(np.unique(ids)) != len(ids):
        raise ValueError(f"{packs_dir}: duplicate pack_id values")
    if is_reference(first):
        relative = (first.metadata or {}).get(TOKENS_FOLDER_KEY, b"../tokens").decode()
        folder = (Path(packs_dir) / relative).resolve()
        table = table.replace_schema_metadata({TOKENS_FOLDER_KEY: str(folder).encode()})
    return table


def token_store(table: pa.Table) -> TokenStore | None:
    """The tokens store a reference manifest reads from; None for an inline manifest."""
    if not is_reference(table.schema):
        return None
    folder = (table.schema.metadata or {}).get(TOKENS_FOLDER_KEY)
    if folder is None:
        raise ValueError("a reference manifest without its tokens folder: use read_packs")
    return TokenStore(folder.decode())


def loss_weight(supervised: int | np.ndarray, reduction: str) -> np.ndarray:
    """Per-token weight of a sample with x supervised tokens: 1, 1/x or 1/√x (InternVL)."""
    x = np.asarray(supervised, dtype=np.float64)
    if reduction == "token":
        return np.ones_like(x)
    safe = np.maximum(x, 1.0)  # a sample with no supervised token has no weighted token
    if reduction == "sample":
        return 1.0 / safe
    if reduction == "square":
        return 1.0 / np.sqrt(safe)
    raise ValueError(f"loss reduction must be one of {LOSS_REDUCTIONS}, got {reduction!r}")


def pack_weight_sums(table: pa.Table, reduction: str) -> np.ndarray:
    """Σ over a pack's supervised tokens of their weight, per pack: Σ_k x_k · w(x_k)."""
    sup = table.column("supervised").combine_chunks()
    x = pc.list_flatten(sup).to_numpy(zero_copy_only=False).astype(np.float64)
    parent = pc.list_parent_indices(sup).to_numpy(zero_copy_only=False)
    return np.bincount(parent, weights=x * loss_weight(x, reduction), minlength=len(table))


def pack_rng(seed: int, pack_id: int, epoch: int) -> np.random.Generator:
    """The augmentation RNG of one pack in one epoch (independent of workers and ranks)."""
    return np.random.default_rng([seed, pack_id, epoch])


def jpeg_degrade(tile: Image.Image, quality: int) -> Image.Image:
    """Re-encode a tile as JPEG at ``quality`` and decode it (InternVL's augmentation)."""
    with io.BytesIO() as buf:
        tile.convert("RGB").save(buf, format="JPEG", quality=int(quality))
        buf.seek(0)
        return Image.open(buf).convert("RGB")


class UnreadableImage(Exception):
    """An image of a pack cannot be decoded (it changed or broke after curation)."""


def rebuild_tiles(image: dict, *, image_size: int, root: Path | None = None) -> list[Image.Image]:
    """The tiles of one manifest image: its recorded grid, row-major, thumbnail last."""
    path = Path(image["path"])
    if not path.is_absolute() and root is not None:
        path = root / path
    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
    except Exception as e:  # noqa: BLE001 - any decoder failure: the file broke after curation
        raise UnreadableImage(f"{path}: {type(e).__name__}: {e}") from e
    tiles = crop_tiles(
        rgb, image["cols"], image["rows"], image_size=image_size, use_thumbnail=image["thumbnail"]
    )
    if len(tiles) != tiles_of(image):
        raise ValueError(
            f"{path}: grid {image['cols']}x{image['rows']} thumbnail="
            f"{image['thumbnail']} gives {len(tiles)} tiles, manifest says "
            f"{tiles_of(image)}"
        )
    return tiles


def normalize(tiles: list[Image.Image], image_size: int):
    """(N, 3, S, S) float32 tensor, ImageNet mean/std (torchvision ToTensor + Normalize)."""
    import torch

    if not tiles:
        return torch.zeros((0, 3, image_size, image_size), dtype=torch.float32)
    arr = np.stack([np.asarray(t, dtype=np.float32) for t in tiles]) / 255.0
    arr = (arr - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2)))


def shift_targets(labels: np.ndarray, seq_lens: np.ndarray) -> np.ndarray:
    """Next-token targets inside each sample: labels[t+1], IGNORE at every sample's last token."""
    targets = np.full_like(labels, IGNORE_INDEX)
    targets[:-1] = labels[1:]
    targets[np.cumsum(seq_lens) - 1] = IGNORE_INDEX
    return targets


@dataclass(frozen=True)
class StepLayout:
    """Which packs each optimizer step, rank and micro-step trains on."""

    n_packs: int
    batch_packs: int = 1  # packs per micro-batch per rank (concatenated into one sequence)
    accum: int = 1  # micro-batches per optimizer step
    world: int = 1  # ranks
    seed: int = 0

    @property
    def packs_per_step(self) -> int:
        return self.batch_packs * self.accum * self.world

    def steps_for_epochs(self, epochs: float) -> int:
        return max(1, math.ceil(epochs * self.n_packs / self.packs_per_step))

    def epoch_order(self, epoch: int) -> np.ndarray:
        if epoch == 0:
            return np.arange(self.n_packs)
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_packs)

    def slots(self, start: int, count: int) -> list[tuple[int, int]]:
        """(row index, epoch) of stream slots start..start+count-1."""
        out, orders = [], {}
        for p in range(start, start + count):
            epoch, i = divmod(p, self.n_packs)
            if epoch not in orders:
                orders[epoch] = self.epoch_order(epoch)
            out.append((int(orders[epoch][i]), epoch))
        return out

    def step_slots(self, step: int) -> list[tuple[int, int]]:
        return self.slots(step * self.packs_per_step, self.packs_per_step)

    def micro_slots(self, step: int, rank: int, micro: int) -> list[tuple[int, int]]:
        first = step * self.packs_per_step + (micro * self.world + rank) * self.batch_packs
        return self.slots(first, self.batch_packs)


class PackBatches:
    """Map-style dataset: item k is rank ``rank``'s k-th micro-batch from ``start_step`` on.

    An item is a dict of tensors for one sequence (the micro-batch's packs concatenated):
    ``input_ids``, ``position_ids`` (restarting per sample), ``targets`` (shifted labels),
    ``weights`` (per target token), ``seq_lens``, ``pixel_values`` (N tiles), ``jpeg_quality``
    (per tile, -1 when not augmented), ``weight_sum`` (the whole optimizer step's Σw), and
    ``step``, ``micro``, ``n_tokens``, ``n_tiles``, ``pack_ids``, and ``skipped``: the samples
    left out because an image could not be read (sample_id, pack_id, detail). Such a sample's
    tokens leave the batch; the step's Σw still counts them (the other micro-batches of the step
    are loaded elsewhere), so that step's loss is scaled down by the sample's weight share.
    """

    def __init__(
        self,
        table: pa.Table,
        layout: StepLayout,
        *,
        rank: int = 0,
        start_step: int = 0,
        end_step: int,
        image_size: int,
        tokens_per_tile: int,
        image_token_id: int,
        reduction: str = "square",
        root: Path | None = None,
        augment: bool = True,
    ):
        self.table = table
        self.layout = layout
        self.rank = rank
        self.start_step = start_step
        self.end_step = end_step
        self.image_size = image_size
        self.tokens_per_tile = tokens_per_tile
        self.image_token_id = image_token_id
        self.reduction = reduction
        self.root = root
        self.augment = augment
        self.pack_sums = pack_weight_sums(table, reduction)
        self.store = token_store(table)

    def __len__(self) -> int:
        return max(0, self.end_step - self.start_step) * self.layout.accum

    def step_weight_sum(self, step: int) -> float:
        return float(sum(self.pack_sums[i] for i, _ in self.layout.step_slots(step)))

    def __getitem__(self, k: int) -> dict:
        import torch

        if not 0 <= k < len(self):
            raise IndexError(k)
        step = self.start_step + k // self.layout.accum
        micro = k % self.layout.accum
        parts = [
            self.load_pack(i, epoch) for i, epoch in self.layout.micro_slots(step, self.rank, micro)
        ]
        cat = {
            key: np.concatenate([p[key] for p in parts])
            for key in (
                "input_ids",
                "position_ids",
                "targets",
                "weights",
                "seq_lens",
                "jpeg_quality",
            )
        }
        pixels = torch.cat([p["pixel_values"] for p in parts])
        return {
            "input_ids": torch.from_numpy(cat["input_ids"].astype(np.int64)),
            "position_ids": torch.from_numpy(cat["position_ids"].astype(np.int64)),
            "targets": torch.from_numpy(cat["targets"].astype(np.int64)),
            "weights": torch.from_numpy(cat["weights"].astype(np.float32)),
            "seq_lens": torch.from_numpy(cat["seq_lens"].astype(np.int32)),
            "pixel_values": pixels,
            "jpeg_quality": torch.from_numpy(cat["jpeg_quality"].astype(np.int16)),
            "weight_sum": torch.tensor(self.step_weight_sum(step), dtype=torch.float64),
            "step": step,
            "micro": micro,
            "n_tokens": int(cat["input_ids"].size),
            "n_tiles": int(pixels.shape[0]),
            "pack_ids": [p["pack_id"] for p in parts],
            "skipped": [x for p in parts for x in p["skipped"]],
        }

    def _inline(self, i: int) -> tuple[np.ndarray, np.ndarray, list[dict]]:
        """ids, labels and images of pack row i of an inline manifest."""
        t = self.table
        ids = t.column("input_ids")[i].values.to_numpy(zero_copy_only=False).astype(np.int64)
        labels = t.column("labels")[i].values.to_numpy(zero_copy_only=False).astype(np.int64)
        return ids, labels, t.column("images")[i].as_py()

    def _referenced(self, i: int) -> tuple[np.ndarray, np.ndarray, list[dict]]:
        """ids, labels and images of pack row i of a reference manifest (the tokens store)."""
        columns = ("pack_id", "sample_ids", "token_shards", "token_rows", "seq_lens")
        row = {c: self.table.column(c)[i].as_py() for c in (*columns, "image_counts")}
        return resolve_pack(self.store, row, self.image_token_id)

    def load_pack(self, i: int, epoch: int) -> dict:
        """One pack's arrays, tiles and per-token weights (validated against the manifest)."""
        t = self.table
        pack_id = int(t.column("pack_id")[i].as_py())
        if self.store is None:
            ids, labels, images = self._inline(i)
        else:
            ids, labels, images = self._referenced(i)
        seq_lens = np.asarray(t.column("seq_lens")[i].as_py(), dtype=np.int64)
        supervised = np.asarray(t.column("supervised")[i].as_py(), dtype=np.int64)
        sample_ids = t.column("sample_ids")[i].as_py()
        if (
            len(ids) != len(labels)
            or seq_lens.sum() != len(ids)
            or len(supervised) != len(seq_lens)
        ):
            raise ValueError(f"pack {pack_id}: input_ids, labels, seq_lens, supervised disagree")
        targets = shift_targets(labels, seq_lens)
        sample_of = np.repeat(np.arange(len(seq_lens)), seq_lens)
        counted = np.bincount(sample_of[targets != IGNORE_INDEX], minlength=len(seq_lens))
        if not np.array_equal(counted, supervised):
            raise ValueError(
                f"pack {pack_id}: supervised tokens per sample {counted.tolist()} "
                f"!= manifest {supervised.tolist()}"
            )
        weights = np.where(
            targets != IGNORE_INDEX, loss_weight(supervised, self.reduction)[sample_of], 0.0
        )
        position_ids = np.arange(len(ids)) - np.repeat(np.cumsum(seq_lens) - seq_lens, seq_lens)

        rng = pack_rng(self.layout.seed, pack_id, epoch)
        per_image, skipped = [], {}  # (sample index, tiles, qualities); sample index -> why
        for image in images:
            try:
                these = rebuild_tiles(image, image_size=self.image_size, root=self.root)
            except UnreadableImage as e:
                skipped[image["sample_index"]] = str(e)
                continue
            q = np.full(len(these), -1)
            if self.augment and image["data_augment"]:
                q = rng.integers(JPEG_QUALITIES[0], JPEG_QUALITIES[1] + 1, size=len(these))
                these = [jpeg_degrade(tile, qq) for tile, qq in zip(these, q, strict=True)]
            per_image.append((image["sample_index"], these, q.tolist()))
        if skipped:  # the sample leaves this pack: its tokens, labels and other images
            keep = ~np.isin(sample_of, list(skipped))
            ids, targets, weights, position_ids = (
                ids[keep],
                targets[keep],
                weights[keep],
                position_ids[keep],
            )
            seq_lens = np.delete(seq_lens, list(skipped))
            per_image = [p for p in per_image if p[0] not in skipped]
        tiles = [t for _, these, _ in per_image for t in these]
        qualities = [q for _, _, qs in per_image for q in qs]
        n_context = int((ids == self.image_token_id).sum())
        if n_context != self.tokens_per_tile * len(tiles):
            raise ValueError(
                f"pack {pack_id}: {n_context} <IMG_CONTEXT> tokens for "
                f"{len(tiles)} tiles x {self.tokens_per_tile}"
            )
        return {
            "pack_id": pack_id,
            "input_ids": ids,
            "position_ids": position_ids,
            "targets": targets,
            "weights": weights,
            "seq_lens": seq_lens,
            "pixel_values": normalize(tiles, self.image_size),
            "jpeg_quality": np.asarray(qualities, dtype=np.int64),
            "skipped": [
                {"sample_id": sample_ids[k], "pack_id": pack_id, "detail": why}
                for k, why in sorted(skipped.items())
            ],
        }


def make_loader(dataset: PackBatches, *, workers: int, seed: int, pin_memory: bool = False):
    """A DataLoader over micro-batches in order; its own generator leaves the global RNG alone."""
    import torch
    from torch.utils.data import DataLoader

    return DataLoader(
        dataset,
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=2 if workers else None,
        generator=torch.Generator().manual_seed(seed),
    )
