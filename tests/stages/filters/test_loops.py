"""Loop detectors and the content view: spans with content repeated to the end, counting loops,
a paragraph given twice, and what counts as content (words) rather than layout."""

from __future__ import annotations

import pytest

from curate.stages.filters.config import FilterConfig
from curate.stages.filters.layout import content_of
from curate.stages.filters.loops import counting_loop, tail_loop
from curate.stages.filters.rules import check_sample
from tests.stages.filters.helpers import sample

CONFIG = FilterConfig(decode_images=False)


def _rules(answer: str, domain: str = "general") -> set[str]:
    return {r.rule for r in check_sample(sample(answer, domain=domain), CONFIG)[1]}


# --- content view ------------------------------------------------------------------------------


def test_content_keeps_words_drops_layout():
    text = (
        "Title\n=====\n\n"
        "- First item, here.\n"
        "| a | 2.5 |\n|---|---|\n"
        "```python\n    x = 1   # note\n```\n"
        "     |  \n"
        "\\frac{a}{b} \\\\ C:\\Users\\me"
    )
    assert content_of(text) == "title\nfirst item here\na 2 5\nx 1 note\na b c users me\n"


def test_content_paragraphs_ignore_layout_only_lines():
    # A separator between two copies of a paragraph does not hide that it is given twice.
    para = "The model answers the question about the chart in one careful sentence."
    assert "repeated_paragraph" in _rules(f"Intro line here.\n\n{para}\n\n-----\n\n{para}")
    assert "repeated_paragraph" not in _rules(f"{para}\n\nSomething else.\n\n{para}")


# --- tail loops --------------------------------------------------------------------------------


def test_tail_loop_counts_a_last_copy_cut_short():
    span = " A long paragraph that the model gives again, word for word, until it stops."
    loop = tail_loop("Intro." + span + span[:40])
    assert loop.period == len(span) and 1.5 < loop.repeats < 2


def test_tail_loop_finds_lines_with_dot_leaders():
    # The last 16 characters are all dots: the probe recurs at every shift of the leader,
    # but the loop is the whole line.
    line = "\nNotes for Application Developers " + "." * 44 + " 12"
    loop = tail_loop("CONTENTS" + line * 6 + line[:60])
    assert loop.period == len(line) and loop.repeats > 6 and loop.content


def test_layout_loops_only_as_whole_lines():
    assert not tail_loop("Heading\n" + "=" * 200).content  # an underline: layout
    assert "tail_loop" not in _rules("Heading\n" + "=" * 200)
    assert "tail_loop" in _rules("A table:\n" + "\n|---|---|---|" * 20)  # border lines looping


def test_short_repeats_are_not_loops():
    for answer in ("Yes! Yes! Yes! Yes!", "ha ha ha ha ha", "True\nTrue\nTrue\nTrue"):
        assert "tail_loop" not in _rules(answer)


# --- counting loops ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tail",
    [
        ", ".join(str(k) for k in range(17, 120)),
        "\n".join(f"{k}." for k in range(1, 60)),
        " ".join(f"{k / 10:.1f}" for k in range(1, 80)),
        "\n".join(str(k) for k in range(90, 140)),  # crosses 99 -> 100
        " ".join(f"{k / 20:.2f}" for k in range(43, 201)),  # ends on the first wider number
    ],
)
def test_number_sequences_count_on(tail):
    found = counting_loop("The values are listed below.\n" + tail)
    assert found.items > 32 and not found.content
    assert "counting_loop" in _rules("The values are listed below.\n" + tail)


def test_list_items_counting_on_are_tail_loops():
    answer = "Steps:\n" + "\n".join(f"{k}. Build and run the tests again." for k in range(3, 15))
    found = counting_loop(answer)
    assert found.items == 12 and found.content
    assert "tail_loop" in _rules(answer)
    # Cut by the token limit just after the count grew a digit.
    cut = "Steps:\n" + "\n".join(f"{k}. Build and run the tests again." for k in range(2, 10))
    assert "tail_loop" in _rules(cut + "\n10. Build and r")


def test_table_rows_whose_labels_step_are_not_counting():
    # cp1250 ... cp1258: the digits belong to a word, and the values around them repeat.
    rows = "\n".join(f"| cp{1250 + k} | 307 | 5 | 5 |" for k in range(9))
    assert counting_loop("| module | lines | defs | classes |\n" + rows).items == 0
    assert _rules("| module | lines | defs | classes |\n|---|---|---|---|\n" + rows) == set()


def test_short_numbered_lists_and_axes_are_not_loops():
    for answer in (
        "Years shown: " + ", ".join(str(y) for y in range(2001, 2021)),
        "1. Open the file.\n2. Edit it.\n3. Save it.",
        "Days: " + " ".join(str(d) for d in range(1, 32)),
    ):
        assert _rules(answer) == set(), answer


def test_counting_loop_threshold_per_domain_can_be_raised():
    answer = "Axis ticks: " + ", ".join(str(k) for k in range(1, 60))
    assert "counting_loop" in _rules(answer)
    cfg = FilterConfig(
        decode_images=False, overrides={"chart": {"counting_loop": {"threshold": 100}}}
    )
    assert check_sample(sample(answer, domain="chart"), cfg)[1] == []
