"""The benchmark index: sorted n-gram hashes of every question and banded image pHashes.

Both are plain numpy arrays (a few bytes per n-gram or image: small enough to ship to every
worker), searched with ``np.searchsorted``:

- **text**: each question is normalised as the near-duplicate step does (lower case,
  placeholders, punctuation and whitespace out) and split into words; each window of
  ``ngram`` words within one turn is hashed. A question shorter than ``ngram`` but of at least
  ``min_words`` words is one window of its own length (GPT-3's rule for short items), found
  in a training turn by hashing that turn's windows of the same length.
- **images**: each benchmark pHash is cut into ``image_distance + 1`` bands; a training image
  within ``image_distance`` bits agrees with it on one band (pigeonhole), so looking up the
  training image's bands finds every benchmark image to check, then the distance decides.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import xxhash

from curate.stages.decontaminate.benchmarks import BenchmarkItems
from curate.stages.neardup.images import hamming, hash_bands
from curate.stages.neardup.text import normalise

_PRIME = np.uint64(0x100000001B3)


def word_hashes(words: list[str]) -> np.ndarray:
    return np.fromiter(
        (xxhash.xxh3_64_intdigest(w.encode()) for w in words), dtype=np.uint64, count=len(words)
    )


def window_hashes(hashes: np.ndarray, n: int) -> np.ndarray:
    """A hash of every window of ``n`` consecutive words (polynomial, wraps modulo 2^64),
    salted with n so that windows of different lengths never meet."""
    count = len(hashes) - n + 1
    if count <= 0:
        return np.zeros(0, np.uint64)
    out = np.full(count, np.uint64(n), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):
            out = out * _PRIME + hashes[j : j + count]
    return out


@dataclass
class BenchmarkIndex:
    """What a training sample is checked against (see the module docstring)."""

    names: list[str]
    items: list[str]
    bench_of_item: np.ndarray  # item -> benchmark number
    ngram: int
    text_hashes: np.ndarray  # sorted window hashes
    text_items: np.ndarray  # item of each
    text_lengths: np.ndarray  # window lengths in the index (ngram and shorter questions)
    image_keys: np.ndarray  # sorted band keys
    image_owner: np.ndarray  # benchmark image number of each key
    image_hashes: np.ndarray  # pHash per benchmark image
    image_items: np.ndarray  # item per benchmark image
    image_bands: int
    image_distance: int
    items_per_benchmark: dict[str, int]
    unreadable_images: dict[str, int]

    @classmethod
    def build(
        cls, found: BenchmarkItems, ngram: int, min_words: int, image_distance: int
    ) -> BenchmarkIndex:
        names = list(dict.fromkeys(found.benchmark))
        bench_of_item = np.array([names.index(b) for b in found.benchmark], np.int32)
        t_hashes, t_items = [], []
        for k, questions in enumerate(found.questions):
            for q in questions:
                words = normalise(q).split()
                n = ngram if len(words) >= ngram else len(words)
                if n < min_words:
                    continue
                w = window_hashes(word_hashes(words), n)
                t_hashes.append(w)
                t_items.append(np.full(len(w), k, np.int32))
        th = np.concatenate(t_hashes) if t_hashes else np.zeros(0, np.uint64)
        ti = np.concatenate(t_items) if t_items else np.zeros(0, np.int32)
        o = np.argsort(th, kind="stable")
        lengths = sorted(
            {ngram} | {_length(q, ngram, min_words) for qs in found.questions for q in qs}
        )
        img = [(h, k) for k, hs in enumerate(found.image_hashes) for h in hs]
        ih = np.array([h for h, _ in img], np.uint64)
        ii = np.array([k for _, k in img], np.int32)
        bands = image_distance + 1
        keys = hash_bands(ih, bands).reshape(-1)
        owner = np.repeat(np.arange(len(ih)), bands)
        ko = np.argsort(keys, kind="stable")
        return cls(
            names=names,
            items=list(found.item),
            bench_of_item=bench_of_item,
            ngram=ngram,
            text_hashes=th[o],
            text_items=ti[o],
            text_lengths=np.array([n for n in lengths if n > 0], np.int32),
            image_keys=keys[ko],
            image_owner=owner[ko],
            image_hashes=ih,
            image_items=ii,
            image_bands=bands,
            image_distance=image_distance,
            items_per_benchmark=dict(found.items_per_benchmark),
            unreadable_images=dict(found.unreadable_images),
        )

    def text_match(self, turns: list[str]) -> tuple[int, str] | None:
        """The first benchmark item whose question shares a window with these user turns,
        and the shared words; None when there is none."""
        if not len(self.text_hashes):
            return None
        for turn in turns:
            words = normalise(turn).split()
            hashes = word_hashes(words)
            for n in self.text_lengths.tolist():
                w = window_hashes(hashes, n)
                if not len(w):
                    continue
                at = np.searchsorted(self.text_hashes, w)
                at = np.minimum(at, len(self.text_hashes) - 1)
                hit = np.flatnonzero(self.text_hashes[at] == w)
                if len(hit):
                    start = int(hit[0])
                    return int(self.text_items[at[start]]), " ".join(words[start : start + n])
        return None

    def image_matches(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For training pHashes: (training position, benchmark item, distance) of every
        benchmark image within ``image_distance`` bits."""
        hashes = np.asarray(hashes, np.uint64)
        if not len(hashes) or not len(self.image_keys):
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
        keys = hash_bands(hashes, self.image_bands).reshape(-1)
        lo = np.searchsorted(self.image_keys, keys, "left")
        hi = np.searchsorted(self.image_keys, keys, "right")
        counts = hi - lo
        train = np.repeat(np.repeat(np.arange(len(hashes)), self.image_bands), counts)
        starts = np.repeat(lo, counts)
        offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        bench_img = self.image_owner[starts + offsets]
        d = hamming(hashes[train], self.image_hashes[bench_img])
        ok = d <= self.image_distance
        pairs = np.unique(np.stack([train[ok], bench_img[ok]], axis=1), axis=0)
        if not len(pairs):
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
        dist = hamming(hashes[pairs[:, 0]], self.image_hashes[pairs[:, 1]])
        return pairs[:, 0], self.image_items[pairs[:, 1]].astype(np.int64), dist


def _length(question: str, ngram: int, min_words: int) -> int:
    n = len(normalise(question).split())
    return ngram if n >= ngram else (n if n >= min_words else 0)
