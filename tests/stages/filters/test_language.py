"""The language rules: off by default; on for a domain, they flag an answer in another
language than its question, and words that mix scripts, and nothing a short text cannot tell."""

from __future__ import annotations

import math

import pytest

from curate.stages.filters.config import FilterConfig
from curate.stages.filters.language import mixed_script_share, mixed_words
from curate.stages.filters.rules import check_sample
from tests.stages.filters.helpers import sample

pytest.importorskip("lingua")

ON = FilterConfig.model_validate(
    {
        "overrides": {
            "multilingual": {
                "language_mismatch": {"enabled": True},
                "mixed_script": {"enabled": True},
            }
        }
    }
)
QUESTION_DE = "Wie heißt die Hauptstadt von Frankreich, und warum ist sie so bekannt?"
ANSWER_DE = "Die Hauptstadt von Frankreich ist Paris, bekannt für Kunst und Geschichte."
ANSWER_EN = "The capital of France is Paris, known for its art, history and museums."


def _rules(row, cfg=ON) -> dict[str, object]:
    metrics, reasons = check_sample(row, cfg)
    return metrics, {r.rule: r for r in reasons}


def test_off_by_default_and_not_measured():
    metrics, reasons = _rules(sample(ANSWER_EN, question=QUESTION_DE, domain="multilingual"), None)
    assert "language_mismatch" not in reasons and "mixed_script" not in reasons
    assert math.isnan(metrics["language_mismatch"]) and math.isnan(metrics["mixed_script_words"])


def test_an_answer_in_another_language_is_flagged_with_both_languages():
    _, reasons = _rules(sample(ANSWER_EN, question=QUESTION_DE, domain="multilingual"))
    hit = reasons["language_mismatch"]
    assert hit.severity == "flag" and "question de, answer en" in hit.detail
    _, same = _rules(sample(ANSWER_DE, question=QUESTION_DE, domain="multilingual"))
    assert "language_mismatch" not in same


def test_too_short_to_tell_is_not_judged():
    metrics, reasons = _rules(sample("Paris.", question=QUESTION_DE, domain="multilingual"))
    assert math.isnan(metrics["language_mismatch"]) and "language_mismatch" not in reasons


def test_only_where_the_rule_is_on():
    _, reasons = _rules(sample(ANSWER_EN, question=QUESTION_DE, domain="general"))
    assert "language_mismatch" not in reasons


def test_mixed_scripts_inside_words_not_across_them():
    homoglyph = "Log in at pаypal.com to check your аccount details today, then sign out."
    assert mixed_words(homoglyph) == ["pаypal", "аccount"]
    assert mixed_script_share("Привет, world: два слова in two scripts.") == 0
    assert mixed_script_share("東京はとても大きい都市です。カタカナも使います。") == 0
    _, reasons = _rules(sample(homoglyph, domain="multilingual"))
    assert "pаypal" in reasons["mixed_script"].detail
