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

What the rules read (``content_repetition``): every metric per assistant turn (never on one
flat string of the whole conversation, where a question quoted in the answer would look like
repetition), and on the turn's *content* (``layout.content_view``), not on its layout: a
table's borders, a listing's margins or a document's underlines repeat by design. The peers'
formulas above stay exact, for comparison. ``repeated_turns`` finds an answer given twice in
one conversation; the loop detectors are in ``loops`` (``tail_loop`` is importable from here).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from functools import cache

import numpy as np

from curate.stages.filters import layout, loops, ngrams

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
    cps, offsets = ngrams.codepoints(texts)
    return char_ratios_of(cps, offsets, rep_len)


def char_ratios_of(
    cps: np.ndarray, offsets: np.ndarray, rep_len: int = 10, mixed: np.ndarray | None = None
) -> np.ndarray:
    """data-juicer's character n-gram ratio of every text of a batch of code points
    (``mixed``: their ``mix_codepoints``, where already made)."""
    n = len(offsets) - 1
    mixed = ngrams.mix_codepoints(cps) if mixed is None else mixed
    h, owner = ngrams.window_hashes(mixed, offsets, rep_len, mixed=True)
    g_owner, counts = ngrams.group_counts(h, owner)
    distinct = np.bincount(g_owner, minlength=n)
    singles = np.bincount(g_owner, weights=counts == 1, minlength=n)
    total = np.bincount(g_owner, weights=counts, minlength=n)
    k = np.minimum(np.floor(np.sqrt(distinct)), distinct - singles).astype(np.int64)
    top = ngrams.top_k_sums(g_owner, counts, k, n)
    return np.divide(top, total, out=np.zeros(n), where=total > 0)


def word_ratios_of(symbols: np.ndarray, offsets: np.ndarray, rep_len: int = 10) -> np.ndarray:
    """data-juicer's word n-gram ratio of every text, its words given as 64-bit symbols."""
    n = len(offsets) - 1
    h, owner = ngrams.window_hashes(symbols, offsets, rep_len, mixed=True)
    g_owner, counts = ngrams.group_counts(h, owner)
    total = np.bincount(g_owner, weights=counts, minlength=n)
    repeated = np.bincount(g_owner, weights=counts * (counts > 1), minlength=n)
    return np.divide(repeated, total, out=np.zeros(n), where=total > 0)


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
    if not texts:
        return np.zeros(0)
    symbols, offsets = _word_symbols(texts, "dj")
    return word_ratios_of(symbols, offsets, rep_len)


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

# The loop detectors live in ``loops``; their names stay importable from here.
TailLoop = loops.TailLoop
tail_loop = loops.tail_loop
counting_loop = loops.counting_loop


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


# --- repetition of content (what the rules read) ----------------------------------------------

CONTENT_METRICS = (
    "char_rep_ratio",
    "word_rep_ratio",
    "dup_line_frac",
    "dup_para_frac",
    "repeated_para_chars",
)


def content_repetition(
    texts: list[str],
    *,
    min_chars: int = 64,
    min_lines: int = 4,
    min_paragraphs: int = 3,
    min_line_chars: int = 10,
    rep_len: int = 10,
) -> dict[str, np.ndarray]:
    """Repetition of every text's content (``layout.content_view``: words, not layout), per text.

    - ``char_rep_ratio`` / ``word_rep_ratio``: data-juicer's formulas on the content (texts
      whose content has >= ``min_chars`` characters / >= ``rep_len`` words); content words keep
      their numbers, so rows of a table that differ only in their values do not repeat;
    - ``dup_line_frac``: share of the content's characters in lines (of >= ``min_line_chars``)
      that repeat an earlier line, for texts of >= ``min_lines`` content lines;
    - ``dup_para_frac``: the same for paragraphs, texts of >= ``min_paragraphs`` paragraphs;
    - ``repeated_para_chars``: the longest paragraph given twice in a row (blank lines and
      layout-only paragraphs between the copies ignored).
    """
    out = {k: np.zeros(len(texts)) for k in CONTENT_METRICS}
    for part in ngrams.chunks(texts):
        view = layout.content_view(layout.scan(texts[part]))
        found = content_measures(
            view, min_chars, min_lines, min_paragraphs, min_line_chars, rep_len
        )
        for k, v in found.items():
            out[k][part] = v
    return out


def content_measures(
    view: layout.ContentView,
    min_chars: int,
    min_lines: int,
    min_paragraphs: int,
    min_line_chars: int,
    rep_len: int = 10,
) -> dict[str, np.ndarray]:
    """``content_repetition``'s measures of one content view."""
    n = len(view.offsets) - 1
    chars = np.diff(view.offsets)
    mixed = ngrams.mix_codepoints(view.cps)
    spans = ngrams.SpanHasher(mixed)
    char_ratio = char_ratios_of(view.cps, view.offsets, rep_len, mixed)
    char_ratio[chars < min_chars] = 0.0
    sep = (view.cps == layout.SPACE) | (view.cps == layout.NEWLINE)
    left, right = ngrams.token_spans(ngrams.text_starts(view.offsets, len(view.cps)), sep, ~sep)
    word_counts = np.bincount(ngrams.owners(view.offsets)[left], minlength=n)
    word_offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(word_counts, out=word_offsets[1:])
    word_ratio = word_ratios_of(spans(left, right), word_offsets, rep_len)

    line_len = (view.line_end - view.line_start).astype(np.float64)
    line_hash = spans(view.line_start, view.line_end)
    total = np.bincount(view.line_owner, weights=line_len, minlength=n)
    lines = np.bincount(view.line_owner, minlength=n)
    eligible = line_len >= min_line_chars
    dup = _repeats_earlier(line_hash, view.line_owner) & eligible
    dup_lines = np.bincount(view.line_owner[dup], weights=line_len[dup], minlength=n)
    line_frac = np.divide(
        dup_lines, total, out=np.zeros(n), where=(total > 0) & (lines >= min_lines)
    )

    if not len(view.line_para):
        zeros = np.zeros(n)
        return {
            "char_rep_ratio": char_ratio,
            "word_rep_ratio": word_ratio,
            "dup_line_frac": line_frac,
            "dup_para_frac": zeros,
            "repeated_para_chars": zeros,
        }
    # Paragraphs: runs of content lines with the same paragraph number.
    first = np.concatenate(([True], view.line_para[1:] != view.line_para[:-1]))
    last = np.concatenate((first[1:], [True]))
    p_start, p_end = view.line_start[first], view.line_end[last]
    p_owner = view.line_owner[first]
    p_len = (p_end - p_start).astype(np.float64)
    p_hash = spans(p_start, p_end)
    paras = np.bincount(p_owner, minlength=n)
    p_dup = _repeats_earlier(p_hash, p_owner)
    dup_paras = np.bincount(p_owner[p_dup], weights=p_len[p_dup], minlength=n)
    p_total = np.bincount(p_owner, weights=p_len, minlength=n)
    para_frac = np.divide(
        dup_paras, p_total, out=np.zeros(n), where=(p_total > 0) & (paras >= min_paragraphs)
    )
    again = np.concatenate(([False], (p_hash[1:] == p_hash[:-1]) & (p_owner[1:] == p_owner[:-1])))
    repeated = ngrams.segment_max(p_len[again], p_owner[again], n, empty=0.0)
    return {
        "char_rep_ratio": char_ratio,
        "word_rep_ratio": word_ratio,
        "dup_line_frac": line_frac,
        "dup_para_frac": para_frac,
        "repeated_para_chars": repeated,
    }


def _repeats_earlier(hashes: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """True where an item equals an earlier item of the same text."""
    if not len(hashes):
        return np.zeros(0, dtype=bool)
    keys = (owner.astype(np.uint64) << ngrams.OWNER_SHIFT) | (hashes >> np.uint64(20))
    order = np.argsort(keys, kind="stable")
    k = keys[order]
    out = np.empty(len(keys), dtype=bool)
    out[order] = np.concatenate(([False], k[1:] == k[:-1]))
    return out
