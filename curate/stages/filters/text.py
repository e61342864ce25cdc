"""Text statistics of answers, for a whole batch of turns at once (numpy over code points).

``answer_shape`` and ``shape`` give one value per answer (``shape`` over a ``layout.Scan`` that
the repetition measures share); the rules take a sample's worst answer, so a rule reads "some
answer of this sample has a sentence of 412 words", not an average that hides it.
``char_counts`` and ``placeholder_mismatch`` give one value per sample.
"""

from __future__ import annotations

import re
from functools import cache

import numpy as np

from curate.stages.filters import layout, ngrams

SENTENCE_ENDS = ".!?\n。！？…"
IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"
ZERO = ord("0")
NEWLINE = 10
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


def answer_shape(texts: list[str]) -> dict[str, np.ndarray]:
    """Per answer: empty, its length, and placeholders that have no place in an answer (the
    rest of its shape is ``shape``'s, over a scan of its code points)."""
    return {
        "empty_answers": np.fromiter((not t.strip() for t in texts), float, len(texts)),
        "max_answer_chars": np.fromiter((len(t) for t in texts), float, len(texts)),
        "answer_placeholders": np.fromiter(
            (t.count(IMAGE_TOKEN) + t.count(VIDEO_TOKEN) for t in texts), float, len(texts)
        ),
    }


SHAPE_METRICS = ("max_sentence_words", "max_line_chars", "max_zero_run", "max_char_run")


def shape(sc: layout.Scan) -> dict[str, np.ndarray]:
    """Per text of a scanned batch: the longest sentence (words) and line (characters), the
    longest run of zeros and of any other character that is not layout."""
    n, size = len(sc.offsets) - 1, len(sc.cps)
    if size == 0:
        return {k: np.zeros(n) for k in SHAPE_METRICS}
    cps, space, text_start = sc.cps, sc.space, sc.text_start
    end = _lut("sentence_end")[cps]
    out: dict[str, np.ndarray] = {}

    # Sentences: a new one starts at a text's start or after a sentence end. Words: runs of
    # characters that are neither spaces nor sentence ends.
    prev_end = _shift(end, False)
    sentence_first = text_start | prev_end
    word_start = ~space & ~end & (sentence_first | _shift(space, True))
    starts = np.flatnonzero(sentence_first)
    words = np.add.reduceat(word_start.astype(np.int32), starts)
    out["max_sentence_words"] = ngrams.segment_max(words, sc.owner[starts], n)

    starts = np.flatnonzero(sc.line_first)
    chars = np.diff(np.append(starts, size)) - (cps[np.append(starts[1:], size) - 1] == NEWLINE)
    out["max_line_chars"] = ngrams.segment_max(chars, sc.owner[starts], n)

    # Runs of one character (never across texts).
    run_first = text_start | np.concatenate(([True], cps[1:] != cps[:-1]))
    starts = np.flatnonzero(run_first)
    run_len = np.diff(np.append(starts, size))
    run_char = cps[starts]
    run_owner = sc.owner[starts]
    zeros = run_char == ZERO
    visible = ~space[starts] & ~zeros & ~_layout_runs(sc, starts, run_char)
    out["max_zero_run"] = ngrams.segment_max(run_len[zeros], run_owner[zeros], n)
    out["max_char_run"] = ngrams.segment_max(run_len[visible], run_owner[visible], n)
    return out


def _shift(a: np.ndarray, fill) -> np.ndarray:
    return np.concatenate(([fill], a[:-1]))


# Characters that fill space in any line: rules and underlines, leaders (``Intro ..... 3``),
# form blanks (``Name: ______``), table borders, box drawing.
FILL_CHARS = ".-_=*~#+·…‐‑‒–—―─━═│┃|:/\\"


@cache
def _fill_lut() -> np.ndarray:
    table = np.zeros(0x110000, dtype=bool)
    table[[ord(c) for c in FILL_CHARS]] = True
    table[0x2500:0x2580] = True  # box drawing
    return table


def _layout_runs(sc: layout.Scan, starts: np.ndarray, run_char: np.ndarray) -> np.ndarray:
    """Runs that are layout, not a stuck character: a run of a fill character anywhere, or of
    any punctuation in a line without a word (a reST underline may use ``^`` or ``"``)."""
    line_has_word = np.logical_or.reduceat(sc.word, np.flatnonzero(sc.line_first))
    return _fill_lut()[run_char] | (~sc.word[starts] & ~line_has_word[sc.line_id[starts]])


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
