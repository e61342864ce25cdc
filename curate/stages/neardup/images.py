"""Perceptual hashes of images (pHash, 64 bits) on Pillow + numpy + scipy, and Hamming distances.

The hash is imagehash's ``phash`` (hash_size 8, highfreq_factor 4): the image in grey, resized
to 32×32 with Lanczos, a 2-D DCT-II, the 8×8 lowest frequencies, one bit per coefficient above
their median, first coefficient in the highest bit. Written here rather than imported because
(1) a JPEG is decoded at a fraction of its size from its DCT coefficients (Pillow's ``draft``)
before the resize, which is most of the cost of hashing a large photo (imagehash decodes every
pixel), (2) the DCTs of a batch of images run as one call, and (3) it adds no dependency (scipy
is one already). Without draft decoding the bits equal imagehash's (tested); with it they differ
by 0-2 bits on the demo's photos, well inside any near-duplicate threshold.

Images are hashed once per file: ``HashCache`` keys a file by its resolved path, size and
modification time, so fifty samples of one image cost one decode, and a changed file is hashed
again.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable

import numpy as np
from PIL import Image

HASH_BITS = 64
_SIDE = 32  # pixels the image is resized to (hash_size 8 × highfreq_factor 4)
_LOW = 8  # the DCT's lowest 8 × 8 frequencies make the hash
# Draft-decode a JPEG to at least this many pixels a side (then Lanczos to 32): small enough to
# skip most of the decode, large enough that the resize still averages the detail away.
_DRAFT_SIDE = 128
_BIT_WEIGHTS = (np.uint64(1) << np.arange(HASH_BITS - 1, -1, -1, dtype=np.uint64)).astype(np.uint64)


class ImageHashError(Exception):
    """An image that cannot be decoded for hashing (the filter stage reports why)."""


def grey_thumbnail(path: str, *, draft: bool = True) -> np.ndarray:
    """The image at ``path`` as a 32×32 float array of grey levels (imagehash's input)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                if draft:
                    im.draft("L", (_DRAFT_SIDE, _DRAFT_SIDE))
                grey = im.convert("L").resize((_SIDE, _SIDE), Image.Resampling.LANCZOS)
                return np.asarray(grey, dtype=np.float64)
    except Exception as e:  # noqa: BLE001 - any decoder failure: the file gets no hash
        raise ImageHashError(f"{path}: {type(e).__name__}: {e}") from e


def phash_arrays(thumbs: np.ndarray) -> np.ndarray:
    """pHashes (uint64) of a stack of 32×32 grey arrays, shape (n, 32, 32)."""
    from scipy.fft import dct

    if len(thumbs) == 0:
        return np.zeros(0, dtype=np.uint64)
    coeffs = dct(dct(thumbs, axis=1), axis=2)[:, :_LOW, :_LOW].reshape(len(thumbs), -1)
    bits = coeffs > np.median(coeffs, axis=1, keepdims=True)
    return (bits.astype(np.uint64) * _BIT_WEIGHTS).sum(axis=1, dtype=np.uint64)


def phash_file(path: str, *, draft: bool = True) -> int:
    """The pHash of one image file; raises ImageHashError when it cannot be decoded."""
    return int(phash_arrays(grey_thumbnail(path, draft=draft)[None])[0])


def hamming(a: np.ndarray | int, b: np.ndarray | int) -> np.ndarray:
    """Bits that differ between 64-bit hashes (elementwise)."""
    x = np.bitwise_xor(np.asarray(a, dtype=np.uint64), np.asarray(b, dtype=np.uint64))
    return np.bitwise_count(x).astype(np.int64)


def hash_bands(hashes: np.ndarray, bands: int) -> np.ndarray:
    """Split 64-bit hashes into ``bands`` contiguous bit ranges, shape (n, bands).

    Two hashes within Hamming distance ``bands - 1`` agree on at least one band (pigeonhole),
    so grouping by (band, value) finds every such pair. Each value is tagged with its band
    number in the top byte so that bands never collide with one another.
    """
    hashes = np.asarray(hashes, dtype=np.uint64)
    edges = np.linspace(0, HASH_BITS, bands + 1).round().astype(int)
    out = np.empty((len(hashes), bands), dtype=np.uint64)
    for j in range(bands):
        lo, hi = edges[j], edges[j + 1]
        mask = np.uint64((1 << (hi - lo)) - 1)
        out[:, j] = ((hashes >> np.uint64(lo)) & mask) | (np.uint64(j) << np.uint64(56))
    return out


class HashCache:
    """pHashes of image files, each file decoded once (key: resolved path, size, mtime)."""

    def __init__(self, known: dict[tuple[str, int, int], int] | None = None) -> None:
        self.known: dict[tuple[str, int, int], int | None] = dict(known or {})
        self.decoded = 0  # files decoded by this cache (the rest were known)

    @staticmethod
    def key(path: str) -> tuple[str, int, int] | None:
        try:
            real = os.path.realpath(path)
            st = os.stat(real)
        except OSError:
            return None
        return real, st.st_size, st.st_mtime_ns

    def hashes(self, paths: Iterable[str]) -> list[int | None]:
        """The pHash of every path (None: missing or undecodable), unknown files in a batch."""
        paths = list(paths)
        keys = [self.key(p) for p in paths]
        todo = list(dict.fromkeys(k for k in keys if k is not None and k not in self.known))
        thumbs, ok = [], []
        for k in todo:
            try:
                thumbs.append(grey_thumbnail(k[0]))
                ok.append(k)
            except ImageHashError:
                self.known[k] = None
        self.decoded += len(todo)
        if ok:
            for k, h in zip(ok, phash_arrays(np.stack(thumbs)).tolist(), strict=True):
                self.known[k] = int(h)
        return [None if k is None else self.known[k] for k in keys]
