"""Language checks for multilingual data, both off by default:

- ``language_mismatch``: the answer is in another language than the question (a model trained
  on it learns to switch languages). Languages come from ``lingua-language-detector``, which
  ships its models in its wheel (fastText's would need a download); install it with
  ``pip install 'curate[lang]'``. A text too short to tell, or one lingua is unsure of, is not
  judged (NaN), so a one-word answer or a formula never fires.
- ``mixed_script``: words whose letters come from several scripts (``pаypal`` with a Cyrillic
  ``а``, garbled text that mixes alphabets inside words): the share of such words in the worst
  answer. Scripts written together (Han with kana in Japanese, Han with Hangul) count as one.
"""

from __future__ import annotations

import math
import re
import unicodedata
from functools import lru_cache

from curate.core.errors import CurateError

MIN_LETTERS = 20  # fewer letters than this: the language is not judged
# The language of a text shows in its start; detecting on more only costs (it was measured).
DETECT_CHARS = 400
_WORD = re.compile(r"[^\W\d_]{2,}")
# Scripts that mix inside words of one language: treated as one.
_SAME_SCRIPT = {"HIRAGANA": "CJK", "KATAKANA": "CJK", "HANGUL": "CJK", "CJK": "CJK"}


class LanguageRuleError(CurateError):
    """The language rule is on but its detector is not installed."""


@lru_cache(maxsize=4096)
def script_of(ch: str) -> str:
    """The script of a letter, from its Unicode name (LATIN, CYRILLIC, CJK...)."""
    first = unicodedata.name(ch, "UNKNOWN").split(" ", 1)[0]
    return _SAME_SCRIPT.get(first, first)


def _mixed(word: str) -> bool:
    return len({script_of(c) for c in word}) > 1


def mixed_script_share(text: str) -> float:
    """Share of the words (2+ letters) whose letters come from more than one script."""
    words = _WORD.findall(text)
    return sum(map(_mixed, words)) / len(words) if words else 0.0


def mixed_words(text: str) -> list[str]:
    """The words of ``text`` that mix scripts, in order."""
    return [w for w in _WORD.findall(text) if _mixed(w)]


@lru_cache(maxsize=1)
def _detector():
    try:
        from lingua import LanguageDetectorBuilder
    except ImportError:
        raise LanguageRuleError(
            "the language_mismatch rule needs lingua-language-detector: "
            "pip install 'curate[lang]' (or turn the rule off)"
        ) from None
    # Low accuracy mode (trigram models only): 2.2 ms of CPU per sample against 4.0 ms.
    return LanguageDetectorBuilder.from_all_languages().with_low_accuracy_mode().build()


def detect(texts: list[str]) -> list[str | None]:
    """The language of each text (ISO 639-1), or None when too short or unsure."""
    detector = _detector()
    out: list[str | None] = [None] * len(texts)
    todo = [k for k, t in enumerate(texts) if sum(c.isalpha() for c in t) >= MIN_LETTERS]
    found = detector.detect_languages_in_parallel_of([texts[k][:DETECT_CHARS] for k in todo])
    for k, lang in zip(todo, found, strict=True):
        out[k] = lang.iso_code_639_1.name.lower() if lang is not None else None
    return out


def mismatches(questions: list[str], answers: list[str]) -> tuple[list[float], list[str]]:
    """Per sample: 1.0 when the answer's language differs from the question's, 0.0 when the
    same, NaN when either cannot be told; and a detail such as ``question en, answer de``."""
    langs = detect([*questions, *answers])
    asked, answered = langs[: len(questions)], langs[len(questions) :]
    values, details = [], []
    for q, a in zip(asked, answered, strict=True):
        values.append(math.nan if q is None or a is None else float(q != a))
        details.append(f"question {q or '?'}, answer {a or '?'}")
    return values, details
