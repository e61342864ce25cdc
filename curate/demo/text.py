"""Deterministic synthetic conversation text per domain (general, math, code, OCR, chart).

Real-looking enough that the filters and the scorer have something to read: varied sentence
lengths, multi-step math, small Python functions, transcribed documents, chart readings.
"""

from __future__ import annotations

import random

NOUNS = [
    "river",
    "bridge",
    "market",
    "garden",
    "station",
    "library",
    "harbor",
    "mountain",
    "window",
    "bicycle",
    "lantern",
    "kitchen",
    "forest",
    "museum",
    "street",
    "tower",
]
ADJECTIVES = [
    "quiet",
    "crowded",
    "bright",
    "narrow",
    "ancient",
    "modern",
    "colourful",
    "wide",
    "small",
    "busy",
    "misty",
    "sunlit",
]
VERBS = ["stands", "leans", "stretches", "rests", "appears", "rises", "sits", "waits"]
COLORS = ["red", "blue", "green", "orange", "purple", "grey", "yellow"]
SUBJECTS = ["physics", "chemistry", "biology", "history", "economics", "geography"]
WORDS = [
    "data",
    "model",
    "image",
    "token",
    "layer",
    "vision",
    "language",
    "answer",
    "question",
    "result",
    "value",
    "table",
    "chart",
    "document",
    "page",
    "line",
    "number",
    "total",
    "year",
    "growth",
    "sales",
    "revenue",
    "share",
    "method",
]


def sentence(rng: random.Random) -> str:
    adj, noun, verb = rng.choice(ADJECTIVES), rng.choice(NOUNS), rng.choice(VERBS)
    tail = rng.choice(
        [
            f"near the {rng.choice(NOUNS)}",
            f"under a {rng.choice(COLORS)} sky",
            f"beside a {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}",
            "in the background",
            f"while {rng.randint(2, 9)} people walk past",
        ]
    )
    return f"A {adj} {noun} {verb} {tail}."


def paragraph(rng: random.Random, n: int | None = None) -> str:
    return " ".join(sentence(rng) for _ in range(n or rng.randint(2, 5)))


def general_qa(rng: random.Random) -> tuple[str, str]:
    q = rng.choice(
        [
            "Describe the image in detail.",
            "What is happening in this picture?",
            "What stands out in this scene?",
            "Summarise what you see.",
        ]
    )
    return q, paragraph(rng)


def math_qa(rng: random.Random) -> tuple[str, str]:
    a, b, c = rng.randint(2, 40), rng.randint(2, 40), rng.randint(2, 9)
    q = (
        f"A shop sells {a} apples in the morning and {b} in the afternoon, at {c} dollars each. "
        "How much money does it take in?"
    )
    steps = [
        f"First, count the apples: {a} + {b} = {a + b}.",
        f"Each apple costs {c} dollars, so the total is {a + b} × {c} = {(a + b) * c}.",
        f"Therefore the shop takes in {(a + b) * c} dollars.",
    ]
    return q, " ".join(steps)


def code_qa(rng: random.Random) -> tuple[str, str]:
    name = rng.choice(["total", "mean", "largest", "count_even", "reverse_words"])
    bodies = {
        "total": "def total(xs):\n    s = 0\n    for x in xs:\n        s += x\n    return s",
        "mean": "def mean(xs):\n    if not xs:\n        raise ValueError('empty')\n"
        "    return sum(xs) / len(xs)",
        "largest": "def largest(xs):\n    best = xs[0]\n    for x in xs[1:]:\n"
        "        if x > best:\n            best = x\n    return best",
        "count_even": "def count_even(xs):\n    return sum(1 for x in xs if x % 2 == 0)",
        "reverse_words": "def reverse_words(s):\n    return ' '.join(reversed(s.split()))",
    }
    q = f"Write a Python function `{name}` and explain it briefly."
    a = (
        f"```python\n{bodies[name]}\n```\nThe function `{name}` walks the input once, "
        f"so it runs in linear time. {sentence(rng)}"
    )
    return q, a


def document_lines(rng: random.Random, n: int) -> list[str]:
    return [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))).capitalize() + "."
        for _ in range(n)
    ]


def ocr_qa(lines: list[str]) -> tuple[str, str]:
    return "Transcribe all the text in this document.", "\n".join(lines)


def chart_qa(rng: random.Random, labels: list[str], values: list[int]) -> tuple[str, str]:
    i = max(range(len(values)), key=values.__getitem__)
    q = rng.choice(
        ["Which category has the highest value?", "Read the chart and report the maximum."]
    )
    return (
        q,
        f"The highest bar is {labels[i]} with a value of {values[i]}. "
        f"The lowest is {labels[min(range(len(values)), key=values.__getitem__)]}.",
    )


def science_qa(rng: random.Random) -> tuple[str, str]:
    subj = rng.choice(SUBJECTS)
    return f"Explain one key idea from {subj} in simple words.", paragraph(rng, 3)


def generation_loop(rng: random.Random) -> str:
    """An answer that starts normally and then repeats a span until it ends."""
    start = paragraph(rng, 2)
    span = (
        f" The {rng.choice(NOUNS)} is {rng.choice(COLORS)} and the answer is {rng.randint(2, 9)}."
    )
    return start + span * 40


def training_corpus() -> list[str]:
    """Text to train the demo tokenizer on: every generator, many seeds."""
    rng = random.Random(1234)
    lines = []
    for _ in range(400):
        for gen in (general_qa, math_qa, code_qa, science_qa):
            q, a = gen(rng)
            lines += [q, a]
        lines.append("\n".join(document_lines(rng, 5)))
    lines += [
        "Image-1: <image>\nImage-2: <image>\nFrame-1: <image>\nUser: Assistant:",
        "0123456789 00000000 + - × = ( ) [ ] { } : ; , . ! ? ' \" # _ ` \n\n",
    ]
    return lines
