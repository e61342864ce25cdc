"""Structures documents repeat legitimately must not fire any rule; the same document ending in
a loop of that structure must (one clean example and its looped twin per structure)."""

from __future__ import annotations

import pytest

from curate.stages.filters.config import FilterConfig
from curate.stages.filters.registry import REPETITION_RULES
from curate.stages.filters.rules import check_sample
from tests.stages.filters.helpers import sample

# -- separator and underline lines (reST headings, Markdown rules, banners) -----------------
SEPARATOR = (
    "Installation\n============\n\n"
    "Run the installer and follow the prompts on the screen until it finishes.\n\n"
    "Configuration\n-------------\n\n"
    "Settings live in one file next to the program; edit it with any text editor.\n\n"
    + "=" * 80
    + "\n\nTroubleshooting\n"
    + "*" * 72  # the answer ends with a heading's underline
)
SEPARATOR_LOOP = SEPARATOR + ("\n" + "=" * 80) * 12  # the separator line, emitted again and again

# -- table borders and aligned columns (a reST grid table) ----------------------------------
PACKAGES = [
    ("numpy", "2.3.5", "40 MB"),
    ("polars", "2.1.0", "31 MB"),
    ("pyarrow", "26.0.1", "120 MB"),
    ("pillow", "13.0.0", "12 MB"),
    ("xxhash", "4.1.0", "1 MB"),
    ("orjson", "3.10.0", "2 MB"),
]


def _grid(rows: list[tuple[str, str, str]]) -> str:
    border = "+" + "-" * 12 + "+" + "-" * 10 + "+" + "-" * 9 + "+"
    out = [border, f"| {'Package':<10} | {'Version':<8} | {'Size':>7} |", border.replace("-", "=")]
    for name, version, size in rows:
        out += [f"| {name:<10} | {version:<8} | {size:>7} |", border]
    return "Installed packages:\n\n" + "\n".join(out)


TABLE = _grid(PACKAGES)
TABLE_LOOP = _grid(PACKAGES + [PACKAGES[-1]] * 12)  # the last row, again and again

# -- bullet and number prefixes (a questionnaire: the same sub-items under every question) ---
QUESTIONS = [
    "Do you have Python 3.11 installed?",
    "Is a C compiler on your path?",
    "Can you reach the package index?",
    "Is there 8 GB of free memory?",
]
BULLETS = "Answer each question:\n\n" + "\n".join(
    f"{k}. {q}\n   - [ ] Yes\n   - [ ] No" for k, q in enumerate(QUESTIONS, 1)
)
BULLETS_LOOP = BULLETS + "\n   - [ ] No" * 15


# -- code indentation (deeply nested JSON: runs of spaces, closing braces) -------------------
def _nested(depth: int) -> list[str]:
    lines = ["    " * d + f'"level_{d}": {{' for d in range(depth)]
    lines.append("    " * depth + '"value": 1')
    lines += ["    " * d + "}" + ("," if d else "") for d in reversed(range(depth))]
    return lines


CODE = "{\n" + "\n".join("    " + x for x in _nested(9)) + "\n}"
CODE_LOOP = CODE[:-2] + ("\n" + "    " * 9 + '"value": 1,') * 12


# -- repeated headers and footers of OCR pages ---------------------------------------------
BODIES = [
    "Revenue grew by twelve percent over the year, driven by new markets in Asia.",
    "Operating costs stayed flat while headcount rose by forty people in research.",
    "The board proposes a dividend of two dollars per share, paid in two parts.",
    "Cash reserves reached four hundred million dollars at the end of December.",
]
OCR = "\n\n".join(
    f"ACME CORPORATION - ANNUAL REPORT 2019\n\n{body}\n\nConfidential - for internal use only"
    for body in BODIES
)
OCR_LOOP = OCR + ("\n" + BODIES[-1]) * 10

# -- LaTeX environments (commands, & and \\ on every line) ----------------------------------
LATEX = (
    "\\begin{align*}\n"
    + "\n".join(
        f"\\frac{{\\partial L}}{{\\partial w_{k}}} &= \\frac{{\\partial L}}{{\\partial y}}"
        f"\\,\\frac{{\\partial y}}{{\\partial w_{k}}} \\\\"
        for k in range(1, 8)
    )
    + "\n\\end{align*}"
)
LATEX_LOOP = LATEX.rsplit("\n", 1)[0] + "\n\\frac{\\partial L}{\\partial y} &= 2 (y - t) \\\\" * 12

STRUCTURES = {
    # name: (domain, clean, looped)
    "separator_lines": ("general", SEPARATOR, SEPARATOR_LOOP),
    "table_borders_and_columns": ("general", TABLE, TABLE_LOOP),
    "bullet_and_number_prefixes": ("general", BULLETS, BULLETS_LOOP),
    "code_indentation": ("programming", CODE, CODE_LOOP),
    "ocr_headers_and_footers": ("ocr", OCR, OCR_LOOP),
    "latex_environment": ("mathematics", LATEX, LATEX_LOOP),
}
CONFIG = FilterConfig(decode_images=False)


@pytest.mark.parametrize("name", sorted(STRUCTURES))
def test_clean_structure_fires_no_rule(name):
    domain, clean, _ = STRUCTURES[name]
    metrics, reasons = check_sample(sample(clean, domain=domain), CONFIG)
    assert reasons == [], (name, [(r.rule, r.value) for r in reasons])


@pytest.mark.parametrize("name", sorted(STRUCTURES))
def test_looped_structure_is_a_tail_loop(name):
    domain, _, looped = STRUCTURES[name]
    _, reasons = check_sample(sample(looped, domain=domain), CONFIG)
    rules = {r.rule for r in reasons}
    assert "tail_loop" in rules and rules <= REPETITION_RULES, (name, rules)
