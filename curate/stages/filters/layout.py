"""Content apart from layout: what the repetition rules measure.

Documents repeat their layout legitimately: separator and underline lines (``-----``,
``=====``), table borders and pipes, aligned columns, bullet and number prefixes, code
indentation and fences, ``pydoc``'s ``|`` margins, LaTeX commands and ``&`` / ``\\\\``. A loop
repeats what it *says*. ``content_view`` keeps, for a whole batch of answers at once (numpy over
code points), only their words: letters and digits (lower-cased), one space where a line had
anything else between two words, one ``\\n`` per line that has a word, and the line and
paragraph each word belongs to. Lines without a word (separators, borders, blank margins,
fences) are dropped; LaTeX command names (``\\frac``, ``\\begin``) are not words.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np

from curate.stages.filters import ngrams

NEWLINE, SPACE, BACKSLASH, COLON = 10, 32, 92, 58
FENCE_CHARS = (ord("`"), ord("~"))


@cache
def word_lut() -> np.ndarray:
    """True for the code points of words: letters and digits of any script (str.isalnum)."""
    return np.fromiter((chr(c).isalnum() for c in range(0x110000)), dtype=bool, count=0x110000)


@cache
def lower_lut() -> np.ndarray:
    """Each code point's lower case where that is one code point (so offsets do not move)."""

    def low(c: int) -> int:
        s = chr(c).lower()
        return ord(s) if len(s) == 1 else c

    return np.fromiter((low(c) for c in range(0x110000)), dtype=np.uint32, count=0x110000)


@cache
def space_lut() -> np.ndarray:
    table = np.zeros(0x110000, dtype=bool)
    table[[c for c in range(0x3001) if chr(c).isspace()]] = True
    return table


@dataclass(frozen=True, slots=True)
class ContentView:
    """The words of a batch of texts, line by line (see the module docstring)."""

    cps: np.ndarray  # uint32: every text's content, each line ended by "\n"
    offsets: np.ndarray  # int64, texts + 1: where each text's content starts
    line_start: np.ndarray  # content lines as [start, end) in cps, without their "\n"
    line_end: np.ndarray
    line_owner: np.ndarray  # text of each content line
    line_para: np.ndarray  # paragraph of each content line (increasing over the batch)


def _empty(n: int) -> ContentView:
    none = np.zeros(0, np.int64)
    return ContentView(np.zeros(0, np.uint32), np.zeros(n + 1, np.int64), none, none, none, none)


def _shift(a: np.ndarray, fill) -> np.ndarray:
    """a[i - 1] at i (``fill`` at 0)."""
    return np.concatenate(([fill], a[:-1]))


def _drop_commands(cps: np.ndarray, word: np.ndarray, text_start: np.ndarray) -> np.ndarray:
    """LaTeX commands (``\\frac``, ``\\begin``) are markup, not content: a word that starts
    with an ASCII letter right after a backslash which itself follows no word and no ``:``
    (``C:\\Users\\me`` is a path, its words stay)."""
    slash = np.flatnonzero(cps[:-1] == BACKSLASH)  # backslashes are rare: work on them only
    if not len(slash):
        return word
    nxt = cps[slash + 1]
    letter = ((nxt >= 65) & (nxt <= 90)) | ((nxt >= 97) & (nxt <= 122))
    before = np.maximum(slash - 1, 0)
    path = (slash > 0) & (word[before] | (cps[before] == COLON)) & ~text_start[slash]
    starts = slash[letter & ~path & ~text_start[slash + 1]] + 1
    if not len(starts):
        return word
    run = np.cumsum(~word)  # equal along a run of word characters
    dropped = np.zeros(int(run[-1]) + 1, dtype=bool)
    dropped[run[starts]] = True
    return word & ~dropped[run]


def _fence_lines(sc: Scan, nonspace: np.ndarray) -> np.ndarray:
    """Lines whose first visible characters are a code fence (``` or ~~~)."""
    fence = np.zeros(sc.n_lines, dtype=bool)
    cps = sc.cps
    head = cps[:-2]
    at = np.flatnonzero((head == FENCE_CHARS[0]) | (head == FENCE_CHARS[1]))
    if not len(at):
        return fence
    at = at[(cps[at + 1] == cps[at]) & (cps[at + 2] == cps[at])]
    line_start = np.flatnonzero(sc.line_first)
    for p in at:  # a few per code block: only spaces may come before it on its line
        line = sc.line_id[p]
        if not nonspace[line_start[line] : p].any():
            fence[line] = True
    return fence


@dataclass(frozen=True, slots=True)
class Scan:
    """One pass over a batch of texts' code points, shared by every measure that reads them."""

    cps: np.ndarray  # uint32 code points of all texts
    offsets: np.ndarray  # int64, texts + 1
    owner: np.ndarray  # text of every code point
    text_start: np.ndarray  # True at the first code point of each (non-empty) text
    line_first: np.ndarray  # True at the first code point of each line
    line_id: np.ndarray  # line of every code point (increasing over the batch)
    space: np.ndarray  # whitespace (str.isspace)
    word: np.ndarray  # letters and digits (str.isalnum)

    @property
    def n_lines(self) -> int:
        return int(self.line_id[-1]) + 1 if len(self.line_id) else 0


def scan(texts: list[str]) -> Scan:
    """Code points, lines, spaces and word characters of a batch of texts."""
    cps, offsets = ngrams.codepoints(texts)
    owner = ngrams.owners(offsets)
    text_start = ngrams.text_starts(offsets, len(cps))
    line_first = text_start | _shift(cps == NEWLINE, False) if len(cps) else text_start
    return Scan(
        cps,
        offsets,
        owner,
        text_start,
        line_first,
        np.cumsum(line_first) - 1,
        space_lut()[cps],
        word_lut()[cps],
    )


def content_view(sc: Scan) -> ContentView:
    """The content of every text of a scanned batch."""
    n, size = len(sc.offsets) - 1, len(sc.cps)
    if size == 0:
        return _empty(n)
    cps, owner, text_start, line_id = sc.cps, sc.owner, sc.text_start, sc.line_id
    raw_line_owner = owner[sc.line_first]

    word = _drop_commands(cps, sc.word, text_start)
    nonspace = ~sc.space
    line_starts = np.flatnonzero(sc.line_first)
    has_word = np.logical_or.reduceat(word, line_starts)
    blank = ~np.logical_or.reduceat(nonspace, line_starts)
    keep_line = has_word & ~_fence_lines(sc, nonspace)
    # A paragraph starts at a text's first line and at a non-blank line after a blank one.
    text_first_line = np.concatenate(([True], raw_line_owner[1:] != raw_line_owner[:-1]))
    para = np.cumsum(text_first_line | (_shift(blank, True) & ~blank)) - 1

    pos = np.flatnonzero(word & keep_line[line_id])
    if not len(pos):
        return _empty(n)
    lid = line_id[pos]
    same_line = lid[1:] == lid[:-1]
    gap = np.concatenate(([False], same_line & (np.diff(pos) > 1)))  # a space before
    last = np.concatenate((~same_line, [True]))  # a newline after
    emitted = 1 + gap.astype(np.int64) + last
    end = np.cumsum(emitted)
    at = end - 1 - last  # where each word character lands
    out = np.empty(int(end[-1]), dtype=np.uint32)
    out[at] = lower_lut()[cps[pos]]
    out[at[gap] - 1] = SPACE
    out[at[last] + 1] = NEWLINE
    per_text = np.bincount(owner[pos], weights=emitted, minlength=n).astype(np.int64)
    out_offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(per_text, out=out_offsets[1:])
    first_in_line = np.concatenate(([True], ~same_line))
    kept = lid[first_in_line]
    return ContentView(
        out,
        out_offsets,
        at[first_in_line],
        at[last] + 1,
        raw_line_owner[kept],
        para[kept],
    )


def as_texts(view: ContentView) -> list[str]:
    """The content of every text as a string (tests and details; the rules use the arrays)."""
    data = view.cps.tobytes().decode("utf-32-le")
    return [data[a:b] for a, b in zip(view.offsets[:-1], view.offsets[1:], strict=True)]


def content_of(text: str) -> str:
    """The content of one text (see ``content_view``)."""
    return as_texts(content_view(scan([text])))[0]
