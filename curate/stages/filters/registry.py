"""The filter rules: which metric each reads, how it fails, its default threshold and severity.

A rule fails a sample when its metric is above (``>``) or below (``<``) the threshold; a metric
that does not apply (NaN: image rules on a text sample) never fails. Severity ``reject`` removes
the sample; ``flag`` keeps it, marked for review (the paper reviews heuristic hits by hand before
removing them). Every threshold, severity and on/off can be changed in the pipeline file, for
all data or per dataset or domain (``FilterConfig``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    metric: str
    op: Literal[">", "<"]
    threshold: float
    severity: Literal["reject", "flag"]
    family: Literal["text", "repetition", "duplicate", "image"]
    description: str
    enabled: bool = True


RULES: tuple[Rule, ...] = (
    # Text of the answers.
    Rule(
        "empty_answer",
        "empty_answers",
        ">",
        0,
        "reject",
        "text",
        "an assistant turn is empty or whitespace only",
    ),
    Rule(
        "answer_too_long",
        "max_answer_chars",
        ">",
        20_000,
        "flag",
        "text",
        "an assistant turn has more characters than this",
    ),
    Rule(
        "long_sentence",
        "max_sentence_words",
        ">",
        200,
        "flag",
        "text",
        "an answer has a sentence of more words than this (a run-on or unpunctuated dump)",
    ),
    Rule(
        "long_line",
        "max_line_chars",
        ">",
        4_000,
        "flag",
        "text",
        "an answer has a line of more characters than this",
    ),
    Rule(
        "zero_run",
        "max_zero_run",
        ">",
        64,
        "flag",
        "text",
        "an answer has a run of more zeros than this (a 64-bit word or a double's 52-bit"
        " mantissa written out is not one)",
    ),
    Rule(
        "char_run",
        "max_char_run",
        ">",
        64,
        "flag",
        "text",
        "an answer repeats one visible character (not 0) more times in a row than this",
    ),
    Rule(
        "control_chars",
        "control_chars",
        ">",
        0,
        "reject",
        "text",
        "control characters (other than tab, newline, CR) in any turn",
    ),
    Rule(
        "replacement_char",
        "replacement_chars",
        ">",
        0,
        "reject",
        "text",
        "U+FFFD replacement characters (text decoded from broken bytes) in any turn",
    ),
    Rule(
        "image_in_answer",
        "answer_placeholders",
        ">",
        0,
        "reject",
        "text",
        "<image> or <video> placeholders inside an assistant turn",
    ),
    Rule(
        "language_mismatch",
        "language_mismatch",
        ">",
        0,
        "flag",
        "text",
        "the answers' language differs from the questions' (lingua; off by default: turn it "
        "on for multilingual data, needs pip install 'curate[lang]')",
        enabled=False,
    ),
    Rule(
        "mixed_script",
        "mixed_script_words",
        ">",
        0.05,
        "flag",
        "text",
        "share of an answer's words whose letters mix scripts (a Cyrillic letter in a Latin "
        "word, garbled text); off by default",
        enabled=False,
    ),
    Rule(
        "placeholder_mismatch",
        "placeholder_mismatch",
        ">",
        0,
        "reject",
        "text",
        "user-turn placeholders do not match the sample's images or video",
    ),
    # Repetition (conversation-aware: per assistant turn).
    Rule(
        "duplicate_lines",
        "dup_line_frac",
        ">",
        0.5,
        "flag",
        "repetition",
        "share of an answer's content characters in lines (of >= min_line_chars) that repeat an"
        " earlier line (answers of >= min_lines content lines; layout-only lines ignored)",
    ),
    Rule(
        "duplicate_paragraphs",
        "dup_para_frac",
        ">",
        0.4,
        "flag",
        "repetition",
        "share of an answer's content characters in paragraphs that repeat an earlier one"
        " (>= min paragraphs)",
    ),
    Rule(
        "repeated_paragraph",
        "repeated_para_chars",
        ">",
        20,
        "flag",
        "repetition",
        "a paragraph of more content characters than this given twice in a row",
    ),
    Rule(
        "char_repetition",
        "char_rep_ratio",
        ">",
        0.5,
        "flag",
        "repetition",
        "data-juicer's character 10-gram repetition ratio of an answer's content (words, not"
        " layout; content of >= min chars)",
    ),
    Rule(
        "word_repetition",
        "word_rep_ratio",
        ">",
        0.7,
        "flag",
        "repetition",
        "data-juicer's word 10-gram repetition ratio of an answer's content words (numbers kept)",
    ),
    Rule(
        "internvl_repetition",
        "internvl_rep_ratio",
        ">",
        0.4,
        "flag",
        "repetition",
        "InternVL's check: distinct repeated word 10-grams / all 10-grams of an answer "
        "(off by default, as in InternVL)",
        enabled=False,
    ),
    Rule(
        "tail_loop",
        "tail_loop_repeats",
        ">",
        3,
        "flag",
        "repetition",
        "an answer ends in a span with content repeated more times than this (a generation loop;"
        " numbers in the span may count on); layout repeats only as whole lines",
    ),
    Rule(
        "counting_loop",
        "counting_loop_items",
        ">",
        32,
        "flag",
        "repetition",
        "an answer ends counting on: more numbers than this stepping evenly in a repeated"
        " template with no word (1, 2, 3, … or 0.1 0.2 0.3 …)",
    ),
    Rule(
        "repeated_turns",
        "repeated_turns",
        ">",
        0,
        "flag",
        "repetition",
        "answers that repeat an earlier answer of the same conversation",
    ),
    # Duplicates across the whole run.
    Rule(
        "duplicate_sample",
        "duplicate_of_earlier",
        ">",
        0,
        "reject",
        "duplicate",
        "same normalised conversation and images as an earlier sample (any dataset)",
    ),
    # Images.
    Rule(
        "image_unreadable",
        "unreadable_images",
        ">",
        0,
        "reject",
        "image",
        "an image whose pixels cannot be decoded (truncated or corrupt file)",
    ),
    Rule(
        "image_too_small",
        "min_image_side",
        "<",
        28,
        "flag",
        "image",
        "an image's shorter side has fewer pixels than this",
    ),
    Rule(
        "image_aspect_ratio",
        "max_aspect_ratio",
        ">",
        10,
        "flag",
        "image",
        "an image's long side / short side exceeds this",
    ),
    Rule(
        "image_blank",
        "min_image_std",
        "<",
        2.0,
        "flag",
        "image",
        "an image is near-uniform: grey-level standard deviation (0-255) below this",
    ),
    Rule(
        "image_clipped",
        "max_clipped_share",
        ">",
        0.01,
        "flag",
        "image",
        "a 16-bit or float image (mode I;16, I, F) of which more than this share of pixels is"
        " clipped to 0 or 255 by the trainer's convert('RGB')",
    ),
)

RULES_BY_NAME: dict[str, Rule] = {r.name: r for r in RULES}

# Built-in thresholds per domain, where a domain's documents repeat more than prose does: code
# repeats lines and phrases (similar functions, pydoc's inherited methods), OCR pages repeat
# boilerplate (licence bundles, running headers). They sit between the defaults and the
# pipeline file: any ``rules:`` or ``overrides:`` setting wins. README's filter section has
# them as a table.
DOMAIN_THRESHOLDS: dict[str, dict[str, float]] = {
    "programming": {"duplicate_lines": 0.7, "duplicate_paragraphs": 0.6, "word_repetition": 0.95},
    "ocr": {"duplicate_lines": 0.6, "word_repetition": 0.85},
}
REPETITION_RULES = frozenset(r.name for r in RULES if r.family == "repetition")
