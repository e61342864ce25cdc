"""Text statistics of answers, for a whole batch of turns at once (numpy over code points).

Each function takes the turns' texts and ``owner`` (the sample each turn belongs to) and returns
one value per sample: the worst turn's value, so a rule reads "some answer of this sample has a
sentence of 412 words", not an average that hides it.
"""

from __future__ import annotations

import re
from functools import cache

import numpy as np

from curate.stages.filters import ngrams

SENTENCE_ENDS = ".!?\n。！？…"
IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"
ZERO = ord("0")
# C0 controls other than tab, newline and carriage return; DEL; C1 controls.
CONTROL_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


@cache
def _lut(kind: str) -> np.ndarray:
    """A boolean table over all code points: whitespace or sentence ends."""
    table = np.zeros(0x110000, dtype=bool)
    if kind == "space":
        table[[c for c in range(0x3001) if chr(c).isspace()]] = True
    elif kind == "sentence_end":
        table[[ord(c) for c in SENTENCE_ENDS]] = True
    return table


def _segment_starts(offsets: np.ndarray, size: int) -> np.ndarray:
    starts = np.zeros(size, dtype=bool)
    firsts = offsets[:-1][np.diff(offsets) > 0]
    starts[firsts] = True
    return starts


def _per_sample_max(values: np.ndarray, turn_owner: np.ndarray, n: int) -> np.ndarray:
    return ngrams.segment_max(values, turn_owner, n, empty=0.0)


def char_counts(texts: list[str], owner: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """Control characters and U+FFFD replacement characters per sample (all turns)."""
    found = CONTROL_CHARS.search
    control = np.fromiter(
        (len(CONTROL_CHARS.findall(t)) if found(t) else 0 for t in texts),
        dtype=np.float64,
        count=len(texts),
    )
    replacement = np.fromiter(
        (t.count("\ufffd") for t in texts), dtype=np.float64, count=len(texts)
    )
    return {
        "control_chars": np.bincount(owner, weights=control, minlength=n),
        "replacement_chars": np.bincount(owner, weights=replacement, minlength=n),
    }


def answer_shape(texts: list[str], owner: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """Per sample, over its answers: empty answers, the longest answer, the longest sentence
    (words) and line (characters), the longest run of zeros and of any other visible character,
    and placeholders that have no place in an answer."""
    out: dict[str, np.ndarray] = {}
    lengths = np.fromiter((len(t) for t in texts), dtype=np.float64, count=len(texts))
    empty = np.fromiter((not t.strip() for t in texts), dtype=bool, count=len(texts))
    placeholders = np.fromiter(
        (t.count(IMAGE_TOKEN) + t.count(VIDEO_TOKEN) for t in texts),
        dtype=np.float64,
        count=len(texts),
    )
    out["empty_answers"] = np.bincount(owner[empty], minlength=n).astype(np.float64)
    out["max_answer_chars"] = _per_sample_max(lengths, owner, n)
    out["answer_placeholders"] = np.bincount(owner, weights=placeholders, minlength=n)

    cps, offsets = ngrams.codepoints(texts)
    size = len(cps)
    turn_of = ngrams.owners(offsets)
    if size == 0:
        for k in ("max_sentence_words", "max_line_chars", "max_zero_run", "max_char_run"):
            out[k] = np.zeros(n)
        return out
    space = _lut("space")[cps]
    end = _lut("sentence_end")[cps]
    text_start = _segment_starts(offsets, size)

    # Sentences: a new one starts at a turn's start or after a sentence end. Words: runs of
    # characters that are neither spaces nor sentence ends.
    prev_end = np.concatenate(([False], end[:-1]))
    prev_space = np.concatenate(([True], space[:-1]))
    sentence_id = np.cumsum(text_start | prev_end) - 1
    in_word = ~space & ~end
    word_start = in_word & (text_start | prev_space | prev_end)
    words = np.bincount(sentence_id, weights=word_start)
    sentence_turn = turn_of[np.flatnonzero(text_start | prev_end)]
    out["max_sentence_words"] = _per_sample_max(
        _per_turn_max(words, sentence_turn, len(texts)), owner, n
    )

    newline = cps == 10
    prev_newline = np.concatenate(([False], newline[:-1]))
    line_id = np.cumsum(text_start | prev_newline) - 1
    line_chars = np.bincount(line_id, weights=~newline)
    line_turn = turn_of[np.flatnonzero(text_start | prev_newline)]
    out["max_line_chars"] = _per_sample_max(
        _per_turn_max(line_chars, line_turn, len(texts)), owner, n
    )

    # Runs of one character (never across turns).
    run_start = text_start | np.concatenate(([True], cps[1:] != cps[:-1]))
    starts = np.flatnonzero(run_start)
    run_len = np.diff(np.append(starts, size)).astype(np.float64)
    run_char = cps[starts]
    run_turn = turn_of[starts]
    zeros = run_char == ZERO
    visible = ~space[starts] & ~zeros
    out["max_zero_run"] = _per_sample_max(
        _per_turn_max(run_len[zeros], run_turn[zeros], len(texts)), owner, n
    )
    out["max_char_run"] = _per_sample_max(
        _per_turn_max(run_len[visible], run_turn[visible], len(texts)), owner, n
    )
    return out


def _per_turn_max(values: np.ndarray, turn: np.ndarray, turns: int) -> np.ndarray:
    return ngrams.segment_max(values, turn, turns, empty=0.0)


def placeholder_mismatch(
    user_texts: list[str], owner: np.ndarray, n_images: np.ndarray, is_video: np.ndarray
) -> np.ndarray:
    """How far the user turns' placeholders are from the sample's media, per sample.

    Images: |<image> count − images| (a single image may have no placeholder: InternVL adds
    it). Video: |<video> count − 1| plus any <image>. Text: every placeholder is one too many.
    """
    n = len(n_images)
    img = np.bincount(owner, weights=[t.count(IMAGE_TOKEN) for t in user_texts], minlength=n)
    vid = np.bincount(owner, weights=[t.count(VIDEO_TOKEN) for t in user_texts], minlength=n)
    single_implicit = (n_images == 1) & (img == 0) & (vid == 0)
    image_gap = np.where(single_implicit, 0, np.abs(img - n_images) + vid)
    video_gap = np.where((vid == 0) & (img == 0), 0, np.abs(vid - 1) + img)
    return np.where(is_video, video_gap, image_gap).astype(np.float64)
