"""Repetition metrics: the peers' formulas on hand-computed examples, batch == one-text versions,
loops planted in real-looking text are found, short normal answers are not flagged."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from curate.demo import text as demo_text
from curate.stages.filters.config import FilterConfig
from curate.stages.filters.registry import REPETITION_RULES
from curate.stages.filters.repetition import (
    char_repetition_ratio,
    char_repetition_ratios,
    check_conversations_repetition,
    dj_words,
    gopher_repetition,
    internvl_ngram_repetition,
    internvl_repetition_ratios,
    repeated_turns,
    tail_loop,
    word_repetition_ratio,
    word_repetition_ratios,
)
from curate.stages.filters.rules import check_sample
from tests.stages.filters.helpers import prose, sample

# --- the peers' formulas, by hand ------------------------------------------------------------


def test_char_repetition_ratio_hand_example():
    # "abc"*6, 3-grams: abc ×6, bca ×5, cab ×5 -> 16; k = min(⌊√3⌋, 3 - 0) = 1 -> 6/16.
    assert char_repetition_ratio("abc" * 6, 3) == 0.375
    assert char_repetition_ratio("short", 10) == 0.0  # no n-gram at all
    assert char_repetition_ratio("abcdefghijkl", 3) == 0.0  # all distinct: k = 0


def test_word_repetition_ratio_hand_example():
    # 3-grams: abc ×3, bca ×2, cab ×2, bcd ×1 -> (3 + 2 + 2) / 8.
    assert word_repetition_ratio("a b c a b c a b c d", 3) == 0.875
    # Lower-cased, special characters stripped from both ends, empty words dropped.
    assert dj_words("Hello, World!  (x) 42 ... it's") == ["hello", "world", "x", "it's"]
    assert word_repetition_ratio("Hello, hello HELLO! hello.", 2) == 1.0
    assert word_repetition_ratio("too few words", 10) == 0.0


def test_gopher_repetition_hand_example():
    m = gopher_repetition("x\ny\nx\nx\n\nz")
    assert m["dup_line_frac"] == 0.4  # lines x y x x z: two repeats of five
    assert m["dup_line_char_frac"] == 2 / 10  # two 1-char lines of a 10-char text
    assert m["dup_para_frac"] == 0.0  # paragraphs "x\ny\nx\nx", "z"
    m = gopher_repetition("a b a b")
    assert m["top_2_gram"] == len("a b") * 2 / 7  # "a b" twice
    assert m["duplicated_5_n_grams"] == 0.0
    # Repeated 5-grams: datatrove counts their characters without spaces, skipping ahead.
    words = "one two three four five"
    m = gopher_repetition(f"{words} {words}")
    assert m["duplicated_5_n_grams"] == len(words.replace(" ", "")) / len(f"{words} {words}")
    assert set(gopher_repetition("")) == set(m)  # empty text: zeros, no division by zero


def test_internvl_metric_hand_example():
    # whitespace 3-grams: abc ×3, bca ×2, cab ×2, bcd: 3 distinct repeated of 8.
    assert internvl_ngram_repetition("a b c a b c a b c d", 3) == 0.375
    # An answer given twice in a row: every 10-gram repeats -> about 0.5 > 0.4.
    twice = prose(random.Random(1), 6)
    convs = [{"from": "human", "value": "Describe."}, {"from": "gpt", "value": f"{twice} {twice}"}]
    assert check_conversations_repetition(convs)
    normal = [
        {"from": "human", "value": "Describe."},
        {"from": "gpt", "value": prose(random.Random(2), 8)},
    ]
    assert not check_conversations_repetition(normal)
    # It counts DISTINCT repeated n-grams, so one span looped 40 times scores low (a few
    # distinct n-grams over hundreds): InternVL's check misses the classic generation loop,
    # which tail_loop and word_repetition catch.
    loop = [
        {"from": "human", "value": "Describe."},
        {"from": "gpt", "value": demo_text.generation_loop(random.Random(1))},
    ]
    assert not check_conversations_repetition(loop)
    _, reasons = check_sample(sample(loop[1]["value"]))
    assert {"tail_loop", "word_repetition"} <= {r.rule for r in reasons}


texts = st.text(alphabet="ab .,\n\t0é😀\u3000\x1c", max_size=80)


@settings(max_examples=60, deadline=None)
@given(st.lists(texts, max_size=12), st.integers(1, 5))
def test_batch_versions_equal_one_text_versions(batch, n):
    assert list(char_repetition_ratios(batch, n)) == [char_repetition_ratio(t, n) for t in batch]
    assert list(word_repetition_ratios(batch, n)) == [word_repetition_ratio(t, n) for t in batch]
    assert list(internvl_repetition_ratios(batch, n)) == [
        internvl_ngram_repetition(t, n) for t in batch
    ]


# --- conversation-aware detectors ------------------------------------------------------------


def test_tail_loop_finds_span_and_period():
    loop = tail_loop("Intro sentence here. " + "The answer is 4. " * 10)
    assert loop.span == " The answer is 4."
    assert loop.period == len(loop.span)
    assert loop.repeats > 9.9
    # A loop cut off mid-span (generation stopped at max tokens) is still a loop.
    cut = tail_loop("Intro. " + "and then the tower rises again, " * 8 + "and then the to")
    assert cut.period == len("and then the tower rises again, ")
    assert cut.repeats > 8
    assert tail_loop("No loop here at all, just a sentence.").repeats == 0.0
    assert tail_loop("").repeats == 0.0


def test_repeated_turns_ignore_short_answers():
    long = "The red bicycle leans against the wall of the old station."
    assert repeated_turns([long, "Other answer entirely.", long.upper()]) == 1
    assert repeated_turns(["Yes.", "Yes.", "Yes."]) == 0


SHORT_NORMAL_ANSWERS = [
    "Yes.",
    "No.",
    "4",
    "The answer is 4.",
    "A red car.",
    "It is a cat. It is a cat.",
    "ha ha ha",
    "Yes! Yes! Yes!",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10.",
    "| a | b |\n|---|---|\n| 1 | 2 |",
    "}\n}\n}",
    "Left: 2. Right: 2. Total: 4.",
    "The image shows a dog. The dog is brown.",
    "B",
    "(A) (A) (A)",
    "```python\nprint(1)\nprint(1)\n```",
    "Step 1: add. Step 2: add. Step 3: add.",
    "00:00 - 00:10 intro",
]


@pytest.mark.parametrize("answer", SHORT_NORMAL_ANSWERS)
def test_short_normal_answers_not_flagged(answer):
    _, reasons = check_sample(
        sample(answer), FilterConfig(rules={"internvl_repetition": {"enabled": True}})
    )
    assert [r.rule for r in reasons if r.rule in REPETITION_RULES] == []


def test_multi_turn_short_answers_not_flagged():
    _, reasons = check_sample(sample(["Yes.", "Yes.", "No.", "Yes.", "It is 4.", "It is 4."]))
    assert reasons == []


def test_normal_long_answers_not_flagged():
    rng = random.Random(3)
    for _ in range(30):
        answer = "\n\n".join(prose(rng, rng.randint(2, 6)) for _ in range(rng.randint(1, 4)))
        _, reasons = check_sample(sample(answer))
        assert reasons == [], (answer, reasons)


LOOP_CASES = {
    "demo_loop": demo_text.generation_loop(random.Random(5)),
    "sentence_loop": prose(random.Random(6), 5) + " I think the answer is B." * 12,
    "paragraph_loop": prose(random.Random(7), 3) + ("\n\n" + prose(random.Random(8), 4)) * 5,
    "cut_mid_span": prose(random.Random(9), 4) + " so the total is 12 apples and" * 15 + " so th",
    "number_loop": "The sequence is 1, 2, 3, " + "4, 5, 6, " * 30,
}


@pytest.mark.parametrize("name", sorted(LOOP_CASES))
def test_loops_in_real_looking_text_flagged(name):
    answer = LOOP_CASES[name]
    metrics, reasons = check_sample(sample(answer))
    rules = {r.rule for r in reasons}
    assert rules & REPETITION_RULES, (name, metrics)
    assert "tail_loop" in rules


def test_loop_in_second_answer_of_a_conversation():
    rng = random.Random(11)
    loop = prose(rng, 3) + " The river is blue." * 20
    metrics, reasons = check_sample(sample([prose(rng, 4), loop, "Thanks."]))
    assert {"tail_loop", "word_repetition"} <= {r.rule for r in reasons}
    tail = next(r for r in reasons if r.rule == "tail_loop")
    assert "turn 3" in tail.detail and "The river is blue." in tail.detail


def test_repeated_answer_across_turns_flagged():
    rng = random.Random(12)
    answer = prose(rng, 3)
    _, reasons = check_sample(sample([answer, prose(rng, 2), answer]))
    assert [r.rule for r in reasons] == ["repeated_turns"]
