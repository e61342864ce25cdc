"""Synthetic pack manifests (PACK_SCHEMA) for tests and the training benchmark.

A sample is ``<|im_start|>`` + prompt tokens, each image as ``<img>`` + ``<IMG_CONTEXT>`` ×
256·tiles + ``</img>``, then answer tokens + ``<|im_end|>``; the answer and ``<|im_end|>`` are
supervised. Images are small real files whose tiles the trainer rebuilds from the recorded grid,
exactly as from a real manifest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from curate.core.chat import IGNORE_INDEX, IM_END, IM_START, IMG_CONTEXT, IMG_END, IMG_START
from curate.core.io import write_parquet_atomic
from curate.stages.pack.manifest import PACK_SCHEMA


@dataclass(frozen=True)
class TokenIds:
    """The ids a synthetic sample needs, and the plain-token range to draw text from."""

    im_start: int
    im_end: int
    img_start: int
    img_end: int
    img_context: int
    text_lo: int
    text_hi: int  # exclusive

    @classmethod
    def from_tokenizer(cls, tokenizer) -> TokenIds:
        ids = tokenizer.convert_tokens_to_ids([IM_START, IM_END, IMG_START, IMG_END, IMG_CONTEXT])
        return cls(*ids, text_lo=max(ids) + 1, text_hi=len(tokenizer))


@dataclass
class SynthSample:
    input_ids: list[int]
    labels: list[int]
    images: list[dict] = field(default_factory=list)  # PACK_IMAGE_TYPE minus sample_index
    sample_id: str = ""

    @property
    def supervised(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)

    @property
    def tiles(self) -> int:
        return sum(im["cols"] * im["rows"] + int(im["thumbnail"]) for im in self.images)


def write_image(path: Path, rng: np.random.Generator, width: int, height: int) -> Path:
    """A small noisy gradient image (JPEG or PNG by suffix)."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack(
        [
            x * 255 // max(1, width - 1),
            y * 255 // max(1, height - 1),
            (x + y) * 255 // max(1, width + height - 2),
        ],
        axis=-1,
    )
    noise = rng.integers(0, 60, size=(height, width, 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(path)
    return path


def make_sample(
    rng: np.random.Generator,
    ids: TokenIds,
    *,
    prompt_tokens: int,
    answer_tokens: int,
    images: list[dict] | None = None,
    tokens_per_tile: int = 256,
    sample_id: str = "",
) -> SynthSample:
    """One sample: prompt text, its images' tokens, answer (supervised, with <|im_end|>)."""
    images = images or []
    prompt = [ids.im_start, *rng.integers(ids.text_lo, ids.text_hi, prompt_tokens).tolist()]
    for im in images:
        tiles = im["cols"] * im["rows"] + int(im["thumbnail"])
        prompt += [ids.img_start, *[ids.img_context] * (tiles * tokens_per_tile), ids.img_end]
    answer = [*rng.integers(ids.text_lo, ids.text_hi, answer_tokens).tolist(), ids.im_end]
    return SynthSample(
        input_ids=prompt + answer,
        labels=[IGNORE_INDEX] * len(prompt) + answer,
        images=list(images),
        sample_id=sample_id,
    )


def image_entry(
    path: str | Path,
    cols: int,
    rows: int,
    *,
    thumbnail: bool | None = None,
    data_augment: bool = False,
) -> dict:
    thumb = cols * rows > 1 if thumbnail is None else thumbnail
    return {
        "path": str(path),
        "cols": cols,
        "rows": rows,
        "thumbnail": thumb,
        "data_augment": data_augment,
    }


def pack_rows(packs: list[list[SynthSample]], first_pack_id: int = 0) -> pa.Table:
    """A PACK_SCHEMA table, one row per list of samples."""
    rows = []
    for k, samples in enumerate(packs):
        images = [{"sample_index": i, **im} for i, s in enumerate(samples) for im in s.images]
        rows.append(
            {
                "pack_id": first_pack_id + k,
                "sample_ids": [
                    s.sample_id or f"s{first_pack_id + k}-{i}" for i, s in enumerate(samples)
                ],
                "input_ids": [t for s in samples for t in s.input_ids],
                "labels": [t for s in samples for t in s.labels],
                "seq_lens": [len(s.input_ids) for s in samples],
                "supervised": [s.supervised for s in samples],
                "images": images,
                "n_tokens": sum(len(s.input_ids) for s in samples),
                "n_tiles": sum(s.tiles for s in samples),
            }
        )
    return pa.Table.from_pylist(rows, schema=PACK_SCHEMA)


def write_packs(
    packs: list[list[SynthSample]], packs_dir: Path, *, packs_per_shard: int = 64
) -> Path:
    """Write packs as ``packs_dir/part-XXXXX.parquet`` shards."""
    packs_dir.mkdir(parents=True, exist_ok=True)
    for n, start in enumerate(range(0, len(packs), packs_per_shard)):
        table = pack_rows(packs[start : start + packs_per_shard], first_pack_id=start)
        write_parquet_atomic(table, packs_dir / f"part-{n:05d}.parquet")
    return packs_dir


def samples_from_lengths(
    rng: np.random.Generator,
    ids: TokenIds,
    tokens: np.ndarray,
    tiles: np.ndarray,
    image_paths: list[Path],
    *,
    tokens_per_tile: int = 256,
    data_augment: bool = False,
) -> list[SynthSample]:
    """Samples with exactly the given total tokens and tiles (e.g. ``synthetic_mixture``).

    Tiles go to images of at most 12 grid tiles (+ thumbnail); the text left over is split
    into a prompt and a supervised answer of about 40%.
    """
    out = []
    for i, (n_tok, n_til) in enumerate(zip(tokens.tolist(), tiles.tolist(), strict=True)):
        images, left = [], n_til
        while left > 0:
            grid = 1 if left == 1 else min(12, left - 1)
            path = image_paths[(i + len(images)) % len(image_paths)]
            images.append(image_entry(path, grid, 1, thumbnail=grid > 1, data_augment=data_augment))
            left -= grid + int(grid > 1)
        visual = n_til * tokens_per_tile + 2 * len(images)
        text = max(2, n_tok - visual)
        answer = max(1, int(0.4 * text))
        out.append(
            make_sample(
                rng,
                ids,
                prompt_tokens=max(0, text - answer - 2),
                answer_tokens=answer,
                images=images,
                tokens_per_tile=tokens_per_tile,
                sample_id=f"syn{i}",
            )
        )
    return out
