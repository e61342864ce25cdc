"""Repetition metrics: the peers' formulas, exactly, and detectors that understand conversations.

Peer formulas (each with a one-text reference and, where it pays, a vectorised batch version):

- ``char_repetition_ratio`` / ``word_repetition_ratio``: data-juicer's character and word
  n-gram repetition ratios (``character_repetition_filter``, ``word_repetition_filter`` without
  a tokenizer model).
- ``gopher_repetition``: datatrove's ``GopherRepetitionFilter`` metrics, all of them (datatrove
  stops at the first that fails). Words come from a regex tokenizer, not spaCy, so the n-gram
  fractions can differ slightly from datatrove's on punctuation-heavy text.
- ``internvl_ngram_repetition`` / ``check_conversations_repetition``: InternVL's own check
  (distinct repeated word 10-grams / all 10-grams of an assistant turn, > 0.4).

Detectors for chat data: every metric is computed per assistant turn (never on one flat string
of the whole conversation, where a question quoted in the answer would look like repetition),
``repeated_turns`` finds an answer given twice in one conversation, and ``tail_loop`` finds the
degenerate-generation pattern of a span repeated until the answer ends.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from dataclasses import dataclass
from functools import cache

import numpy as np

from curate.stages.filters import ngrams

# data-juicer strips these from both ends of every word: punctuation, digits, whitespace, a list
# of other symbols, and emoji. Emoji are approximated here by their Unicode blocks (data-juicer
# reads the `emoji` package's list), which only matters for words made of rare symbols.
_OTHER_SPECIAL = (
    "\u00a0\u2002\u2003\u2009\u200a\u200b\u200d\u202f\u3000\ufffc"  # spaces and objects
    "’“”–ー一▬…✦�£•€«»°·═×士＾˘⇓↓↑←→（）§″′´¿−±∈¢ø‚„½¼¾¹²³―⁃，ˌ¸‹›ʺˈʻ¦‐⠀‰‑≤≥‖"
    "◆●■►▼▲▴∆▻¡★☆✱ːº。¯˜¥ɪ≈†上ン：∼⁄・♡✓⊕․．⋅÷１‟；،、¨ाাी्े◦˚"
    "゜ʼ≖ʼ¤ッツシ℃√！【】‿∞➤～πه۩☛₨➩☻๑٪♥ıॽ《‘©﴿٬？▷Г♫∟™ª₪®「—❖」﴾》"
)
_SPECIAL_CHARS = sorted(
    set(string.punctuation + string.digits + string.whitespace) | set(_OTHER_SPECIAL)
)
_EMOJI_RANGES = [
    (0x1F000, 0x1FAFF),
    (0x2600, 0x27BF),
    (0x2B00, 0x2BFF),
    (0x2300, 0x23FF),
    (0xFE00, 0xFE0F),
    (0x203C, 0x203C),
    (0x2049, 0x2049),
    (0x2122, 0x2122),
    (0x2139, 0x2139),
    (0x2194, 0x21AA),
    (0x24C2, 0x24C2),
    (0x25AA, 0x25FE),
    (0x2934, 0x2935),
    (0x3030, 0x3030),
    (0x303D, 0x303D),
    (0x3297, 0x3299),
]


def _char_class(fmt) -> str:
    singles = "".join(fmt(ord(c)) for c in _SPECIAL_CHARS)
    ranges = "".join(f"{fmt(lo)}-{fmt(hi)}" if lo != hi else fmt(lo) for lo, hi in _EMOJI_RANGES)
    return f"[{singles}{ranges}]"


_PY_CLASS = _char_class(lambda cp: f"\\U{cp:08x}")
_PY_STRIP = re.compile(f"^{_PY_CLASS}+|{_PY_CLASS}+$")
_DJ_SPLIT = re.compile(" |\n|\t")
# --- data-juicer ---------------------------------------------------------------------------


def dj_words(text: str) -> list[str]:
    """data-juicer's words without a tokenizer: split on space/newline/tab, lower-case, strip
    special characters from both ends, drop what became empty."""
    words = (_PY_STRIP.sub("", w.lower()) for w in _DJ_SPLIT.split(text) if w)
    return [w for w in words if w]


def char_repetition_ratio(text: str, rep_len: int = 10) -> float:
    """data-juicer's character n-gram repetition ratio of ``text``.

    Counts of all character n-grams, sorted descending; the top k of them, k = min(⌊√distinct⌋,
    number of n-grams seen more than once), over the sum of all counts. 0.0 with no n-gram.
    """
    counts = Counter(text[i : i + rep_len] for i in range(len(text) - rep_len + 1))
    if not counts:
        return 0.0
    freq = sorted(counts.values(), reverse=True)
    k = min(int(math.isqrt(len(freq))), len(freq) - sum(1 for f in freq if f == 1))
    return sum(freq[:k]) / sum(freq)


def word_repetition_ratio(text: str, rep_len: int = 10) -> float:
    """data-juicer's word n-gram repetition ratio: occurrences of n-grams seen more than once
    over all n-gram occurrences (words as in ``dj_words``). 0.0 with no n-gram."""
    words = dj_words(text)
    counts = Counter(" ".join(words[i : i + rep_len]) for i in range(len(words) - rep_len + 1))
    if not counts:
        return 0.0
    return sum(c for c in counts.values() if c > 1) / sum(counts.values())


@ngrams.per_chunk
def char_repetition_ratios(texts: list[str], rep_len: int = 10) -> np.ndarray:
    """``char_repetition_ratio`` of every text, computed for the whole batch at once."""
    n = len(texts)
    cps, offsets = ngrams.codepoints(texts)
    h, owner = ngrams.window_hashes(ngrams.mix_codepoints(cps), offsets, rep_len, mixed=True)
    g_owner, counts = ngrams.group_counts(h, owner)
    distinct = np.bincount(g_owner, minlength=n)
    singles = np.bincount(g_owner, weights=counts == 1, minlength=n)
    total = np.bincount(g_owner, weights=counts, minlength=n)
    k = np.minimum(np.floor(np.sqrt(distinct)), distinct - singles).astype(np.int64)
    top = ngrams.top_k_sums(g_owner, counts, k, n)
    return np.divide(top, total, out=np.zeros(n), where=total > 0)


@cache
def _special_lut() -> np.ndarray:
    lut = np.zeros(0x110000, dtype=bool)
    lut[[ord(c) for c in _SPECIAL_CHARS]] = True
    for lo, hi in _EMOJI_RANGES:
        lut[lo : hi + 1] = True
    return lut


@cache
def _lut_of(chars: str) -> np.ndarray:
    lut = np.zeros(0x110000, dtype=bool)
    lut[[ord(c) for c in chars]] = True
    return lut


# Python's str.split() separators (str.isspace), for InternVL's word split.
_PY_SPACES = "".join(chr(c) for c in range(0x3001) if chr(c).isspace())


def _word_symbols(texts: list[str], kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Words of every text as 64-bit symbols (equal words, equal symbols) and their offsets.

    ``dj``: data-juicer's words (split on space/newline/tab of the lower-cased text, special
    characters stripped from both ends); ``split``: Python's ``str.split()``.
    """
    if kind == "dj":
        texts = [t.lower() for t in texts]
    cps, offsets = ngrams.codepoints(texts)
    start = ngrams.text_starts(offsets, len(cps))
    if kind == "dj":
        sep = _lut_of(" \n\t")[cps]
        core = ~_special_lut()[cps]
    else:
        sep = _lut_of(_PY_SPACES)[cps]
        core = ~sep
    left, right = ngrams.token_spans(start, sep, core)
    symbols = ngrams.span_hashes(cps, left, right)
    counts = np.bincount(ngrams.owners(offsets)[left], minlength=len(texts))
    word_offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(counts, out=word_offsets[1:])
    return symbols, word_offsets


@ngrams.per_chunk
def word_repetition_ratios(texts: list[str], rep_len: int = 10) -> np.ndarray:
    """``word_repetition_ratio`` of every text, computed for the whole batch at once."""
    n = len(texts)
    if n == 0:
        return np.zeros(0)
    symbols, offsets = _word_symbols(texts, "dj")
    h, owner = ngrams.window_hashes(symbols, offsets, rep_len, mixed=True)
    g_owner, counts = ngrams.group_counts(h, owner)
    total = np.bincount(g_owner, weights=counts, minlength=n)
    repeated = np.bincount(g_owner, weights=counts * (counts > 1), minlength=n)
    return np.divide(repeated, total, out=np.zeros(n), where=total > 0)


# --- datatrove (Gopher) ---------------------------------------------------------------------

_PARAGRAPHS = re.compile(r"\n{2,}")
_LINES = re.compile("\n+")
_WORDS = re.compile(r"\d+(?:[.,]\d+)*|\w+(?:'\w+)?|[^\w\s]")
GOPHER_TOP_NGRAMS = (2, 3, 4)
GOPHER_DUP_NGRAMS = (5, 6, 7, 8, 9, 10)


def find_duplicates(items: list[str]) -> tuple[int, int]:
    """Elements already seen earlier in the list: how many, and their total characters."""
    seen: set[str] = set()
    dup, dup_chars = 0, 0
    for x in items:
        if x in seen:
            dup += 1
            dup_chars += len(x)
        else:
            seen.add(x)
    return dup, dup_chars


def _top_ngram_chars(words: list[str], n: int) -> int:
    # Counter.most_common breaks ties by first occurrence, as datatrove relies on.
    grams = Counter(" ".join(words[i : i + n]) for i in range(len(words) - n + 1))
    if not grams:
        return 0
    gram, count = grams.most_common(1)[0]
    return len(gram) * count


def _dup_ngram_chars(words: list[str], n: int) -> int:
    # datatrove: walk the words; an n-gram seen before adds its (space-less) characters and
    # skips n words ahead, otherwise remember it and step one word.
    seen: set[tuple[str, ...]] = set()
    chars, i = 0, 0
    while i < len(words) - n + 1:
        gram = tuple(words[i : i + n])
        if gram in seen:
            chars += sum(len(w) for w in gram)
            i += n
        else:
            seen.add(gram)
            i += 1
    return chars


def gopher_words(text: str) -> list[str]:
    """Word tokens for the Gopher n-gram fractions (words, numbers and punctuation marks)."""
    return _WORDS.findall(text)


def gopher_repetition(text: str) -> dict[str, float]:
    """Every metric of datatrove's GopherRepetitionFilter for ``text`` (0.0 for empty text).

    ``dup_para_frac``/``dup_line_frac``: duplicate paragraphs (split on 2+ newlines after
    strip) / lines (split on newline runs) over their count; ``*_char_frac``: their characters
    over len(text); ``top_{n}_gram`` (n = 2..4): characters of the most frequent word n-gram
    times its count over len(text); ``duplicated_{n}_n_grams`` (n = 5..10): characters of
    repeated n-grams found by datatrove's skip-ahead walk over len(text).
    """
    out: dict[str, float] = {}
    size = len(text)
    paragraphs = _PARAGRAPHS.split(text.strip())
    dup, dup_chars = find_duplicates(paragraphs)
    out["dup_para_frac"] = dup / len(paragraphs)
    out["dup_para_char_frac"] = dup_chars / size if size else 0.0
    lines = _LINES.split(text)
    dup, dup_chars = find_duplicates(lines)
    out["dup_line_frac"] = dup / len(lines)
    out["dup_line_char_frac"] = dup_chars / size if size else 0.0
    words = gopher_words(text)
    for n in GOPHER_TOP_NGRAMS:
        out[f"top_{n}_gram"] = _top_ngram_chars(words, n) / size if size else 0.0
    for n in GOPHER_DUP_NGRAMS:
        out[f"duplicated_{n}_n_grams"] = _dup_ngram_chars(words, n) / size if size else 0.0
    return out


# Datatrove's defaults (Gopher paper, table A1): a text fails when a metric exceeds its value.
GOPHER_THRESHOLDS = {
    "dup_para_frac": 0.3,
    "dup_para_char_frac": 0.2,
    "dup_line_frac": 0.3,
    "dup_line_char_frac": 0.2,
    "top_2_gram": 0.2,
    "top_3_gram": 0.18,
    "top_4_gram": 0.16,
    "duplicated_5_n_grams": 0.15,
    "duplicated_6_n_grams": 0.14,
    "duplicated_7_n_grams": 0.13,
    "duplicated_8_n_grams": 0.12,
    "duplicated_9_n_grams": 0.11,
    "duplicated_10_n_grams": 0.10,
}


def gopher_failures(text: str) -> list[str]:
    """Every Gopher metric of ``text`` above datatrove's default threshold."""
    metrics = gopher_repetition(text)
    return [k for k, limit in GOPHER_THRESHOLDS.items() if metrics[k] > limit]


# --- InternVL -------------------------------------------------------------------------------


def internvl_ngram_repetition(text: str, n: int = 10) -> float:
    """InternVL's ``calculate_ngram_repetition``: distinct whitespace-word n-grams seen more
    than once over all n-grams (0 with none)."""
    words = text.split()
    grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    total = len(words) - n + 1
    return sum(1 for c in grams.values() if c > 1) / total if total > 0 else 0.0


def check_conversations_repetition(
    conversations: list[dict], repeat_threshold: float = 0.4, ngram: int = 10
) -> bool:
    """InternVL's check on an annotation's ``conversations``: True when any ``gpt`` turn's
    n-gram repetition exceeds the threshold (InternVL raises there; its call is disabled)."""
    return any(
        internvl_ngram_repetition(turn["value"], ngram) > repeat_threshold
        for turn in conversations
        if turn["from"] == "gpt"
    )


@ngrams.per_chunk
def internvl_repetition_ratios(texts: list[str], n: int = 10) -> np.ndarray:
    """``internvl_ngram_repetition`` of every text, computed for the whole batch at once."""
    count = len(texts)
    if count == 0:
        return np.zeros(0)
    symbols, offsets = _word_symbols(texts, "split")
    h, w_owner = ngrams.window_hashes(symbols, offsets, n, mixed=True)
    g_owner, counts = ngrams.group_counts(h, w_owner)
    total = np.bincount(w_owner, minlength=count).astype(np.float64)
    repeated = np.bincount(g_owner, weights=counts > 1, minlength=count)
    return np.divide(repeated, total, out=np.zeros(count), where=total > 0)


# --- conversation-aware detectors -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TailLoop:
    """A span repeated until the answer ends: its length, how often, and how much it covers."""

    repeats: float = 0.0  # looped characters / period
    period: int = 0  # characters of the repeated span
    chars: int = 0  # characters at the end of the answer covered by the loop
    span: str = ""


def tail_loop(
    text: str, *, probe_chars: int = 16, max_candidates: int = 8, max_period: int = 4000
) -> TailLoop:
    """The longest periodic stretch that ends the text (trailing whitespace ignored).

    If the end of a text repeats with period p, its last few characters (the probe) also occur
    p characters earlier; so the candidate periods are the distances to the probe's previous
    occurrences (found with ``str.rfind``, at C speed), and each is verified by comparing whole
    periods backwards. The candidate whose repeated copies cover the most characters wins
    (so the true period beats its multiples and a chance recurrence of the probe).
    """
    t = text.rstrip()
    n = len(t)
    m = min(probe_chars, n // 2)
    best = TailLoop()
    if m == 0:
        return best
    probe = t[n - m :]
    pos = n - m
    for _ in range(max_candidates):
        pos = t.rfind(probe, 0, pos + m - 1)
        if pos < 0:
            break
        p = n - m - pos
        if p > max_period:
            break
        if best.period and p % best.period == 0:
            continue  # a multiple of a period already measured covers no more
        unit = t[n - p :]
        start = n - p
        if start < p or t[start - p : start] != unit:
            continue  # not even two periods: nothing repeats here
        while start >= p and t[start - p : start] == unit:
            start -= p
        covered = n - start + _common_suffix(t, start, start + p, p - 1)
        if covered - p > best.chars - best.period:
            best = TailLoop(covered / p, p, covered, unit)
    return best


def _common_suffix(t: str, a: int, b: int, limit: int) -> int:
    """Largest k <= limit with t[a-k:a] == t[b-k:b] (binary search over C-speed compares)."""
    lo, hi = 0, min(limit, a)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if t[a - mid : a] == t[b - mid : b]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _normalise_turn(text: str) -> str:
    return " ".join(text.split()).casefold()


def repeated_turns(turns: list[str], min_chars: int = 20) -> int:
    """Answers of one conversation that repeat an earlier answer (whitespace and case ignored);
    answers shorter than ``min_chars`` ("Yes.") may repeat freely."""
    seen: set[str] = set()
    repeats = 0
    for text in turns:
        key = _normalise_turn(text)
        if len(key) < min_chars:
            continue
        if key in seen:
            repeats += 1
        seen.add(key)
    return repeats


def duplicate_fractions(text: str, min_lines: int, min_paragraphs: int) -> tuple[float, float]:
    """Gopher's duplicate line and paragraph fractions of one answer, or 0.0 where the answer
    has fewer (non-blank) lines / paragraphs than the minimum: two equal lines in a four-line
    answer say nothing."""
    line_frac = para_frac = 0.0
    if text.count("\n") + 1 >= min_lines:
        lines = [x for x in _LINES.split(text.strip()) if x.strip()]
        if len(lines) >= min_lines:
            line_frac = find_duplicates(lines)[0] / len(lines)
    if text.count("\n\n") + 1 >= min_paragraphs:
        paragraphs = _PARAGRAPHS.split(text.strip())
        if len(paragraphs) >= min_paragraphs:
            para_frac = find_duplicates(paragraphs)[0] / len(paragraphs)
    return line_frac, para_frac
