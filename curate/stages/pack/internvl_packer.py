"""InternVL's online packer, re-implemented on (tokens, tiles), and an InternVL-like length mixture.

Both exist to measure `curate.stages.pack.binpack` against what InternVL 2.5 actually does:
the packer is the baseline our offline packer must never lose to, the mixture is the data
both run on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike


@dataclass
class _Buffer:
    """One open pack of InternVL's buffer list: its tile count, token count and members."""

    tiles: int
    tokens: int
    members: list[int] = field(default_factory=list)


def internvl_greedy_pack(
    tokens: ArrayLike,
    tiles: ArrayLike,
    *,
    max_tokens: int,
    max_tiles: int,
    max_buffer_size: int = 20,
    text_dummy_tile: bool = False,
) -> list[list[int]]:
    """Pack samples in input order the way InternVL's `PackedDataset.__iter__` does.

    Mirrors `internvl_chat/internvl/train/dataset_packed.py` (OpenGVLab/InternVL), class
    `PackedDataset`, with its training defaults (`allow_overflow=False`, `max_buffer_size=20`):

    - `find_buffer`: first fit over the buffer list, which is kept sorted by tile count
      (`pixel_values.size(0)`, i.e. tiles, compared to `num_images_expected`) descending; a buffer
      fits when tiles + new tiles <= `num_images_expected` and tokens + new tokens <=
      `max_packed_tokens`. No fit: the sample starts a new buffer.
    - `update_buffer_list`: a buffer that reached `max_packed_tokens` is emitted at once; otherwise
      it is re-inserted before the first buffer with fewer tiles (after its equals).
    - then buffers at exactly `num_images_expected` tiles are emitted from the front, and while
      more than `max_buffer_size` are open the front one (the most tiles) is emitted.
    - when the data is exhausted the remaining buffers are emitted front to back.

    `split_buffer` never fires here because over-cap samples are rejected (ValueError) instead
    of being cut. `text_dummy_tile=True` counts the dummy tile InternVL feeds with a text-only
    sample (`image_flags=0`) against the tile cap; the default counts tiles as given, which is
    the more favourable accounting for this baseline.

    Returns the sample indices of each pack in the order InternVL would yield them.
    """
    tok = np.asarray(tokens, dtype=np.int64).reshape(-1)
    til = np.asarray(tiles, dtype=np.int64).reshape(-1)
    if tok.shape != til.shape:
        raise ValueError(f"tokens and tiles differ in length: {tok.size} != {til.size}")
    if text_dummy_tile:
        til = np.maximum(til, 1)
    _reject_over_cap(tok, til, max_tokens, max_tiles)
    out: list[list[int]] = []
    buffers: list[_Buffer] = []
    for i, (t, k) in enumerate(zip(tok.tolist(), til.tolist(), strict=True)):
        buf = _find_buffer(buffers, t, k, max_tokens, max_tiles) or _Buffer(0, 0)
        buf.tiles += k
        buf.tokens += t
        buf.members.append(i)
        if buf.tokens >= max_tokens:  # `buffer_max_len_list`: full in tokens, yield now
            out.append(buf.members)
        else:
            _insert_sorted(buffers, buf)
        while buffers and buffers[0].tiles == max_tiles:  # exactly `num_images_expected`
            out.append(buffers.pop(0).members)
        while len(buffers) > max_buffer_size:  # buffer overflow: yield the most tiles
            out.append(buffers.pop(0).members)
    out.extend(b.members for b in buffers)  # datasets exhausted: empty the buffer list
    return out


def _find_buffer(
    buffers: list[_Buffer], t: int, k: int, max_tokens: int, max_tiles: int
) -> _Buffer | None:
    """`PackedDataset.find_buffer` with allow_overflow=False: pop the first buffer that fits."""
    for j, buf in enumerate(buffers):
        if buf.tiles + k <= max_tiles and buf.tokens + t <= max_tokens:
            return buffers.pop(j)
    return None


def _insert_sorted(buffers: list[_Buffer], buf: _Buffer) -> None:
    """Insert before the first buffer with fewer tiles, as `update_buffer_list` does."""
    pos = len(buffers)
    for j, other in enumerate(buffers):
        if other.tiles < buf.tiles:
            pos = j
            break
    buffers.insert(pos, buf)


def _reject_over_cap(tok: np.ndarray, til: np.ndarray, max_tokens: int, max_tiles: int) -> None:
    """Raise on the first sample over a cap: InternVL would cut or drop it, we refuse."""
    bad = np.flatnonzero((tok > max_tokens) | (til > max_tiles) | (tok < 0) | (til < 0))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"sample {i} ({int(tok[i])} tokens, {int(til[i])} tiles) is outside the caps "
            f"({max_tokens} tokens, {max_tiles} tiles)"
        )


# --- an InternVL-like mixture of sample lengths ---------------------------------------------

TOKENS_PER_TILE = 256  # (448 / 14)^2 * 0.5^2 after pixel unshuffle
_IMG_WRAP = 2  # <img> ... </img>
_TEMPLATE = 24  # chat template tokens around one human/gpt exchange
# P(grid with g tiles) for one image at max_dynamic_patch=12, g = 1..12: photos and documents
# mostly land on the 12-tile 4x3 / 3x4 grids, small images on 1x1.
_GRID_P = np.array([0.18, 0.05, 0.04, 0.08, 0.01, 0.12, 0.01, 0.06, 0.08, 0.02, 0.01, 0.34])


@dataclass(frozen=True)
class MixtureProfile:
    """Shares of the four InternVL sample kinds and the median text length of image samples."""

    text: float = 0.30
    single: float = 0.50
    multi: float = 0.10
    video: float = 0.10
    image_text_median: float = 200.0
    grid_p: tuple[float, ...] = tuple(_GRID_P.tolist())


REALISTIC = MixtureProfile()
# Document/OCR-heavy SFT: mostly 13-tile images with short answers, so packs fill in tiles first.
IMAGE_HEAVY = MixtureProfile(
    text=0.10,
    single=0.80,
    multi=0.05,
    video=0.05,
    image_text_median=60.0,
    grid_p=(0.10, 0.02, 0.02, 0.04, 0.0, 0.06, 0.0, 0.04, 0.06, 0.01, 0.0, 0.65),
)


def synthetic_mixture(
    n: int, *, seed: int = 0, profile: MixtureProfile = REALISTIC
) -> tuple[np.ndarray, np.ndarray]:
    """Return (tokens, tiles) for n shuffled samples shaped like an InternVL 2.5 SFT mixture.

    Kinds: text-only (0 tiles, 100-2000 tokens); single image (grid of 1-12
    tiles, plus a thumbnail when more than one, 256 tokens per tile, plus text); multi-image
    (2-6 images, each at most max(1, 12 // N) grid tiles); video (8-32 one-tile frames).
    """
    rng = np.random.default_rng(seed)
    shares = np.array([profile.text, profile.single, profile.multi, profile.video])
    kind = rng.choice(4, size=n, p=shares / shares.sum())
    tokens = np.zeros(n, dtype=np.int64)
    tiles = np.zeros(n, dtype=np.int64)
    for code, make in enumerate((_text_only, _single_image, _multi_image, _video)):
        idx = np.flatnonzero(kind == code)
        tokens[idx], tiles[idx] = make(rng, idx.size, profile)
    return tokens, tiles


def _lognormal_int(
    rng: np.random.Generator, n: int, median: float, sigma: float, lo: int, hi: int
) -> np.ndarray:
    """Integer text lengths, log-normal around `median`, clipped to [lo, hi]."""
    x = rng.lognormal(np.log(median), sigma, size=n)
    return np.clip(np.rint(x), lo, hi).astype(np.int64)


def _with_thumbnail(grid: np.ndarray) -> np.ndarray:
    """Tiles of an image: its grid plus the thumbnail InternVL adds to multi-tile grids."""
    return grid + (grid > 1)


def _text_only(rng: np.random.Generator, n: int, p: MixtureProfile) -> tuple[np.ndarray, ...]:
    return _lognormal_int(rng, n, 450.0, 0.6, 100, 2000), np.zeros(n, dtype=np.int64)


def _single_image(rng: np.random.Generator, n: int, p: MixtureProfile) -> tuple[np.ndarray, ...]:
    gp = np.asarray(p.grid_p, dtype=float)
    tiles = _with_thumbnail(rng.choice(np.arange(1, 13), size=n, p=gp / gp.sum()))
    text = _lognormal_int(rng, n, p.image_text_median, 0.9, 16, 3000)
    return tiles * TOKENS_PER_TILE + _IMG_WRAP + _TEMPLATE + text, tiles


def _multi_image(rng: np.random.Generator, n: int, p: MixtureProfile) -> tuple[np.ndarray, ...]:
    count = rng.integers(2, 7, size=n)
    cap = np.maximum(1, 12 // count)
    tiles = np.zeros(n, dtype=np.int64)
    for j in range(6):  # image j exists where count > j; its grid is 1..cap, skewed to cap
        grid = np.minimum(cap, 1 + rng.binomial(cap, 0.8))
        tiles += np.where(count > j, _with_thumbnail(grid), 0)
    text = _lognormal_int(rng, n, 2 * p.image_text_median, 0.8, 30, 3000)
    overhead = count * (_IMG_WRAP + 6) + _TEMPLATE  # "Image-1: <img>...</img>" per image
    return tiles * TOKENS_PER_TILE + overhead + text, tiles


def _video(rng: np.random.Generator, n: int, p: MixtureProfile) -> tuple[np.ndarray, ...]:
    frames = rng.integers(8, 33, size=n)
    text = _lognormal_int(rng, n, 150.0, 0.8, 16, 1500)
    return frames * (TOKENS_PER_TILE + _IMG_WRAP + 5) + _TEMPLATE + text, frames
