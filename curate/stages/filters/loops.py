"""Generation loops: an answer that ends repeating itself.

A loop is positional: the model repeats a span (a sentence, a list item, a code line, a table
row, a paragraph) until it runs out of tokens, so the answer *ends* periodic. Documents repeat
too, but not up to their end with a span that says something: that is what keeps these
detectors quiet on real text (tables, code, OCR pages, LaTeX) where bag-of-n-gram ratios are not.

- ``tail_loop``: the periodic stretch that ends the text, its period and coverage, and whether
  its span has content (a word) or is layout (``-----``, ``|   |``).
- ``counting_loop``: the same after every number is replaced by one placeholder, kept only where
  the numbers in the repeated template step evenly (``1, 2, 3, …``, ``Step 7: …``, ``Step 8: …``):
  a loop that counts on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

_WORD = re.compile(r"[^\W_]")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_DIGITS = re.compile(r"\d+")
PLACEHOLDER = "\ue000"  # a private-use code point: one for every number of a counting template
MAX_PERIOD = 4000
GATE_CHARS = 1024  # counting templates up to half this long pass the cheap test


@dataclass(frozen=True, slots=True)
class TailLoop:
    """A span repeated until the answer ends: its length, how often, and how much it covers."""

    repeats: float = 0.0  # looped characters / period
    period: int = 0  # characters of the repeated span
    chars: int = 0  # characters at the end of the answer covered by the loop
    span: str = ""
    content: bool = False  # the span has a word (letters or digits), not only layout

    @property
    def line_loop(self) -> bool:
        """Whole lines repeat (the span holds a line break)."""
        return "\n" in self.span


def tail_loop(
    text: str, *, probe_chars: int = 16, max_candidates: int = 8, max_period: int = MAX_PERIOD
) -> TailLoop:
    """The longest periodic stretch that ends the text (trailing whitespace ignored).

    If the end of a text repeats with period p, its last few characters (the probe) also occur
    p characters earlier; so the candidate periods are the distances to the probe's previous
    occurrences (``str.rfind``, at C speed). A candidate's coverage is p plus the longest common
    suffix of the text and the text p characters shorter (binary search over C-speed
    compares), so a last copy cut mid-span still counts. The candidate whose copies beyond the
    first cover the most wins (the true period beats its multiples). After a candidate, the
    search jumps before the stretch it covers: inside it the probe recurs at every multiple of
    the period (every character of a ``.....`` leader), which would use up the candidates.
    """
    t = text.rstrip()
    n = len(t)
    m = min(probe_chars, n // 2)
    best = TailLoop()
    if m == 0:
        return best
    # A probe that repeats a short pattern itself (``......``, ``- - -``, ``\n1\n2``) recurs
    # at every shift of that stretch: take the pattern as a candidate, then search with a
    # probe reaching back before the stretch, for a longer period that holds it (a TOC line).
    q = _short_period(t[n - m :])
    if q:
        stretch = q + _common_suffix(t, n, n - q, n - q)
        span = t[n - q :]
        best = TailLoop(stretch / q, q, stretch, span, _WORD.search(span) is not None)
        if stretch + probe_chars >= n:
            return best
        m = stretch + probe_chars // 2
    probe = t[n - m :]
    limit = n - 1  # occurrences of the probe that start before the probe itself
    for _ in range(max_candidates):
        pos = t.rfind(probe, 0, limit)
        if pos < 0:
            break
        p = n - m - pos
        if p > max_period:
            break
        covered = p + _common_suffix(t, n, n - p, n - p)
        if covered - p > best.chars - best.period:
            span = t[n - p :]
            best = TailLoop(covered / p, p, covered, span, _WORD.search(span) is not None)
        limit = min(pos, n - covered) + m - 1
    return best


def _short_period(probe: str) -> int:
    """The smallest period of ``probe`` up to half its length (0: none)."""
    for q in range(1, len(probe) // 2 + 1):
        if probe[q:] == probe[:-q]:
            return q
    return 0


def _common_suffix(t: str, a: int, b: int, limit: int) -> int:
    """Largest k <= limit with t[a-k:a] == t[b-k:b] (binary search over C-speed compares)."""
    lo, hi = 0, min(limit, b)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if t[a - mid : a] == t[b - mid : b]:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass(frozen=True, slots=True)
class CountingLoop:
    """A template repeated until the answer ends with its numbers stepping evenly."""

    items: int = 0  # whole copies of the template counted
    repeats: float = 0.0  # looped characters / period (of the template)
    chars: int = 0
    span: str = ""  # the last copy, with its numbers
    content: bool = False  # the template has a word besides its numbers (``Step 7: …``)


def counting_loop(text: str, *, window: int = 2 * MAX_PERIOD) -> CountingLoop:
    """A loop that counts on: the end of ``text`` (its last ``window`` characters) is periodic
    once every number is one placeholder, and in every number slot of the template the values
    are constant or step evenly (at least one steps). Plain repetition is ``tail_loop``'s."""
    t = text.rstrip()[-window:]
    # Cheap test first, on the last GATE_CHARS only: with every run of digits one 0, the end
    # must already repeat, with a number in the span.
    same_digits = tail_loop(_DIGITS.sub("0", t[-GATE_CHARS:]))
    if same_digits.repeats < 2 or "0" not in same_digits.span:
        return CountingLoop()
    numbers = _NUMBER.findall(t)
    if len(numbers) < 3:
        return CountingLoop()
    norm = _NUMBER.sub(PLACEHOLDER, t)
    lp = tail_loop(norm)
    k = lp.span.count(PLACEHOLDER)
    if k == 0 or lp.repeats < 2:
        return CountingLoop()
    in_loop = norm.count(PLACEHOLDER, len(norm) - lp.chars)
    rows = in_loop // k
    if rows < 3:
        return CountingLoop()
    values = np.array([float(x) for x in numbers[len(numbers) - rows * k :]]).reshape(rows, k)
    items, stepping = _stepping_rows(values)
    if items < 3:
        return CountingLoop()
    words = _WORD.search(lp.span.replace(PLACEHOLDER, "")) is not None
    region = norm[len(norm) - lp.chars :]
    if words and not _counter(region, k, in_loop - rows * k, stepping, "\n" in lp.span):
        return CountingLoop()  # a table whose label's digits happen to step (cp1252, cp1253)
    last = text.rstrip()[-_raw_length(lp.span, numbers[-k:]) :]
    chars = lp.chars * items // rows  # the stretch before the numbers stepped is not counted
    return CountingLoop(items, lp.repeats * items / rows, chars, last, words)


def _stepping_rows(values: np.ndarray) -> tuple[int, np.ndarray]:
    """How many last rows (copies of the template) have every number slot stepping evenly,
    by the last step of its slot, with at least one slot not constant (0 if none); and which
    slots step."""
    steps = np.diff(values, axis=0)
    last = steps[-1]
    scale = np.abs(values).max(axis=0) * 1e-9 + 1e-12
    stepping = np.abs(last) > scale
    if not stepping.any():
        return 0, stepping  # nothing counts on: plain repetition
    same = (np.abs(steps - last) <= scale)[::-1]
    run = np.where(same.all(axis=0), len(same), same.argmin(axis=0))
    return int(run.min()) + 1, stepping


def _counter(region: str, k: int, skipped: int, stepping: np.ndarray, lines: bool) -> bool:
    """Whether a stepping number of the template's last copy is a counter: a number of its own
    (not digits of a word like ``cp1252``) and, where the template is whole lines, the first
    of its line (``7. …``, ``Step 7: …``)."""
    places = [i for i, c in enumerate(region) if c == PLACEHOLDER]
    first = len(places) - k
    for j, pos in enumerate(places[first:]):
        if not stepping[(first + j - skipped) % k]:
            continue
        before = region[pos - 1] if pos else "\n"
        after = region[pos + 1] if pos + 1 < len(region) else "\n"
        if before.isalnum() or after.isalnum():
            continue
        line_start = region.rfind("\n", 0, pos) + 1
        if not lines or PLACEHOLDER not in region[line_start:pos]:
            return True
    return False


def _raw_length(span: str, numbers: list[str]) -> int:
    """Characters of a template copy once its placeholders hold ``numbers``."""
    return len(span) - span.count(PLACEHOLDER) + sum(len(x) for x in numbers)
