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
        32,
        "flag",
        "text",
        "an answer has a run of more zeros than this",
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
        0.3,
        "flag",
        "repetition",
        "share of an answer's lines that repeat an earlier line (answers of >= min lines)",
    ),
    Rule(
        "duplicate_paragraphs",
        "dup_para_frac",
        ">",
        0.3,
        "flag",
        "repetition",
        "share of an answer's paragraphs that repeat an earlier one (>= min paragraphs)",
    ),
    Rule(
        "char_repetition",
        "char_rep_ratio",
        ">",
        0.5,
        "flag",
        "repetition",
        "data-juicer character 10-gram repetition ratio of an answer (>= min chars)",
    ),
    Rule(
        "word_repetition",
        "word_rep_ratio",
        ">",
        0.4,
        "flag",
        "repetition",
        "data-juicer word 10-gram repetition ratio of an answer",
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
        "an answer ends in a span repeated more times than this (a generation loop)",
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
REPETITION_RULES = frozenset(r.name for r in RULES if r.family == "repetition")
