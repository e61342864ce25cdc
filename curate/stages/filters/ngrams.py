"""Vectorised n-gram counting over a batch of texts (numpy, no Python loop per n-gram).

A batch is a flat array of symbols (Unicode code points, or word hashes) with ``offsets``
marking where each text starts; ``owner`` maps a window or a group back to its text. N-grams
are 64-bit polynomial hashes of splitmix64-mixed symbols, counted with one sort: two distinct
n-grams share a hash with probability about 2^-64, which no corpus of realistic size reaches.
"""

from __future__ import annotations

import functools
from functools import cache

import numpy as np

_P = np.uint64(0x9E3779B97F4A7C15)  # odd multiplier of the polynomial hash
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads small integers (code points, ids) over 64 bits."""
    x = x.astype(np.uint64, copy=True)
    x ^= x >> np.uint64(30)
    x *= _M1
    x ^= x >> np.uint64(27)
    x *= _M2
    x ^= x >> np.uint64(31)
    return x


@cache
def _mixed_lut() -> np.ndarray:
    return mix64(np.arange(0x110000, dtype=np.uint64))


def mix_codepoints(cps: np.ndarray) -> np.ndarray:
    """``mix64`` of code points through a lookup table (one gather instead of six passes)."""
    return _mixed_lut()[cps]


def codepoints(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """All texts' code points in one uint32 array, and offsets (len(texts) + 1)."""
    lengths = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    cps = np.frombuffer("".join(texts).encode("utf-32-le"), dtype=np.uint32)
    return cps, offsets


CHUNK_CHARS = 1 << 17


def chunks(texts: list[str], max_chars: int = CHUNK_CHARS) -> list[slice]:
    """Cut a batch into runs of texts of about ``max_chars`` characters in all: numpy passes
    over arrays that fit in the CPU cache are several times faster than over one huge array."""
    out, start, size = [], 0, 0
    for i, t in enumerate(texts):
        size += len(t)
        if size >= max_chars:
            out.append(slice(start, i + 1))
            start, size = i + 1, 0
    if start < len(texts) or not out:
        out.append(slice(start, len(texts)))
    return out


def per_chunk(fn):
    """Make ``fn(texts, *args) -> array (one value per text)`` run chunk by chunk."""

    @functools.wraps(fn)
    def wrapper(texts: list[str], *args, **kwargs) -> np.ndarray:
        parts = [fn(texts[s], *args, **kwargs) for s in chunks(texts)]
        return np.concatenate(parts) if parts else np.zeros(0)

    return wrapper


def owners(offsets: np.ndarray) -> np.ndarray:
    """The text index of every symbol."""
    return np.repeat(np.arange(len(offsets) - 1, dtype=np.int64), np.diff(offsets))


def text_starts(offsets: np.ndarray, size: int) -> np.ndarray:
    """True at the first symbol of every (non-empty) text."""
    starts = np.zeros(size, dtype=bool)
    starts[offsets[:-1][np.diff(offsets) > 0]] = True
    return starts


_R = np.uint64(0xD6E8FEB86659FD93)  # odd, so invertible modulo 2^64
_R_INV = np.uint64(pow(int(_R), -1, 1 << 64))


def span_hashes(cps: np.ndarray, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each span cps[left:right], equal for equal spans wherever they are.

    With C = cumsum(mix(c_i)·R^i), the span's sum C[right] − C[left] = Σ mix(c_i)·R^i depends
    on where it starts only through the factor R^left, which multiplying by R^−left removes
    (R is odd, hence invertible modulo 2^64).
    """
    return SpanHasher(mix_codepoints(cps))(left, right)


class SpanHasher:
    """``span_hashes`` of one array for many sets of spans: the prefix sums are made once."""

    def __init__(self, mixed: np.ndarray) -> None:
        """``mixed``: the symbols, already spread over 64 bits (``mix_codepoints``)."""
        size = len(mixed)
        powers, self._inverse = _powers(size + 1)
        self._prefix = np.zeros(size + 1, dtype=np.uint64)
        with np.errstate(over="ignore"):
            np.cumsum(mixed * powers[:size], out=self._prefix[1:])

    def __call__(self, left: np.ndarray, right: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            return (self._prefix[right] - self._prefix[left]) * self._inverse[left]


_POWERS: list[np.ndarray] = []


def _powers(size: int) -> tuple[np.ndarray, np.ndarray]:
    """R^i and R^-i for i < size (cached and grown geometrically: batches reuse them)."""
    if not _POWERS or len(_POWERS[0]) < size:
        size = max(size, 2 * len(_POWERS[0]) if _POWERS else 1 << 16)
        with np.errstate(over="ignore"):
            p = np.full(size, _R, dtype=np.uint64)
            p[0] = 1
            q = np.full(size, _R_INV, dtype=np.uint64)
            q[0] = 1
            _POWERS[:] = [np.cumprod(p, dtype=np.uint64), np.cumprod(q, dtype=np.uint64)]
    return _POWERS[0], _POWERS[1]


def token_spans(
    text_start: np.ndarray, sep: np.ndarray, core: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Words as [left, right) spans: tokens are runs of non-separators inside one text, and a
    word is its token with non-``core`` symbols stripped from both ends (tokens with no core
    symbol give no word)."""
    size = len(sep)
    prev_sep = np.concatenate(([True], sep[:-1])) if size else sep
    token_id = np.cumsum(~sep & (prev_sep | text_start))
    pos = np.flatnonzero(core & ~sep)
    tok = token_id[pos]
    change = tok[1:] != tok[:-1]
    first = np.concatenate(([True], change)) if len(pos) else np.zeros(0, bool)
    last = np.concatenate((change, [True])) if len(pos) else np.zeros(0, bool)
    return pos[first], pos[last] + 1


def _ngram_hash(mixed: np.ndarray, n: int) -> np.ndarray:
    """Polynomial hashes of all n-symbol windows, built by doubling (log n passes, not n)."""
    powers = {1: mixed}  # length -> hashes of windows of that length
    length = 1
    while length * 2 <= n:
        h = powers[length]
        powers[length * 2] = h[: len(h) - length] * (_P ** np.uint64(length)) + h[length:]
        length *= 2
    # Combine the binary pieces of n, longest first: hash(a + b) = hash(a)·P^len(b) + hash(b).
    out, done = None, 0
    for size in sorted(powers, reverse=True):
        if done + size > n:
            continue
        piece = powers[size]
        if out is None:
            out = piece
        else:
            m = min(len(out), len(piece) - done)
            out = out[:m] * (_P ** np.uint64(size)) + piece[done : done + m]
        done += size
    return out[: len(mixed) - n + 1]


def window_hashes(
    symbols: np.ndarray, offsets: np.ndarray, n: int, *, mixed: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of every n-symbol window that lies inside one text, and each window's text.

    ``mixed``: the symbols are already well-spread 64-bit values (hashes), not small integers.
    """
    if len(symbols) < n:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    with np.errstate(over="ignore"):
        h = _ngram_hash(symbols if mixed else mix64(symbols), n)
    m = len(h)
    owner = owners(offsets)[:m]
    valid = np.arange(m, dtype=np.int64) + n <= offsets[1:][owner]
    return h[valid], owner[valid]


# Group keys hold the text index in the top bits and 44 bits of the n-gram hash below it, so
# one plain sort groups by (text, n-gram). Two n-grams of one text collide with probability
# about W²/2^45 for W windows (1e-7 for a 2,000-character answer): negligible for a ratio.
OWNER_SHIFT = np.uint64(44)
MAX_TEXTS_PER_BATCH = 1 << 20


def group_counts(hashes: np.ndarray, owner: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct (text, n-gram) groups: each group's text and how often it occurs there."""
    if len(hashes) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if owner[-1] >= MAX_TEXTS_PER_BATCH:
        raise ValueError(f"at most {MAX_TEXTS_PER_BATCH} texts per batch")
    keys = (owner.astype(np.uint64) << OWNER_SHIFT) | (hashes >> np.uint64(20))
    keys.sort()
    starts = np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1])))
    counts = np.diff(np.append(starts, len(keys)))
    return (keys[starts] >> OWNER_SHIFT).astype(np.int64), counts


def top_k_sums(
    group_owner: np.ndarray, counts: np.ndarray, k: np.ndarray, n_texts: int
) -> np.ndarray:
    """Per text, the sum of its ``k[text]`` largest group counts."""
    # k never exceeds a text's number of repeated n-grams, so only those can be among its top k.
    repeated = counts > 1
    group_owner, counts = group_owner[repeated], counts[repeated]
    if len(counts) == 0:
        return np.zeros(n_texts)
    big = int(counts.max()) + 1
    order = np.argsort(group_owner * big + (big - 1 - counts), kind="stable")
    go, c = group_owner[order], counts[order]
    first = np.searchsorted(go, go, side="left")
    rank = np.arange(len(go)) - first
    take = rank < k[go]
    return np.bincount(go[take], weights=c[take], minlength=n_texts)


def segment_max(values: np.ndarray, owner: np.ndarray, n: int, empty: float = 0) -> np.ndarray:
    """Per text, the largest of its values (``empty`` where it has none)."""
    out = np.full(n, float(empty))
    if not len(values):
        return out
    values = np.asarray(values, dtype=np.float64)
    if len(owner) > 1 and (owner[1:] < owner[:-1]).any():
        order = np.argsort(owner, kind="stable")
        owner, values = owner[order], values[order]
    # Owners in order: one reduceat over the runs of each owner (ufunc.at is far slower).
    starts = np.flatnonzero(np.concatenate(([True], owner[1:] != owner[:-1])))
    out[owner[starts]] = np.maximum.reduceat(values, starts)
    return out
