"""Measure a batch of samples (every metric a rule reads) and judge them against the rules.

``measure`` turns sample rows (SAMPLE_SCHEMA) into one float column per metric, vectorised over
the batch; ``judge`` compares each rule's metric with its threshold for that sample's dataset
and domain and returns EVERY failed rule of every sample, each a ``Reason`` with its value,
threshold and a detail a reviewer can act on. ``check_sample`` does both for one sample.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.core.records import SAMPLE_SCHEMA
from curate.stages.filters import images as img
from curate.stages.filters import ngrams
from curate.stages.filters import repetition as rep
from curate.stages.filters import text as txt
from curate.stages.filters.config import FilterConfig, ResolvedRule
from curate.stages.filters.dedup import FirstCopy
from curate.stages.filters.registry import RULES, RULES_BY_NAME

# Metric columns, in output order (float64; NaN where a metric does not apply).
METRICS = (
    "empty_answers",
    "max_answer_chars",
    "max_sentence_words",
    "max_line_chars",
    "max_zero_run",
    "max_char_run",
    "control_chars",
    "replacement_chars",
    "answer_placeholders",
    "placeholder_mismatch",
    "dup_line_frac",
    "dup_para_frac",
    "char_rep_ratio",
    "word_rep_ratio",
    "internvl_rep_ratio",
    "tail_loop_repeats",
    "tail_loop_chars",
    "repeated_turns",
    "duplicate_of_earlier",
    "min_image_side",
    "max_aspect_ratio",
    "unreadable_images",
    "min_image_std",
    "max_clipped_share",
)


@dataclass(frozen=True, slots=True)
class Reason:
    """One failed rule of one sample."""

    rule: str
    severity: str
    value: float
    threshold: float
    detail: str = ""


@dataclass
class Batch:
    """A batch of samples, its turns flattened: what ``measure`` and the details read."""

    table: pa.Table
    turn_owner: np.ndarray  # sample of every turn
    turn_index: np.ndarray  # position of the turn in its conversation
    roles: list[str]
    texts: list[str]
    images: list[list[dict]]
    duplicates: dict[str, FirstCopy] = field(default_factory=dict)
    pixels: dict[str, img.Pixels] = field(default_factory=dict)

    @classmethod
    def of(cls, table: pa.Table, duplicates: dict[str, FirstCopy] | None = None) -> Batch:
        conv = table.column("conversations").combine_chunks()
        flat = pc.list_flatten(conv)
        owner = pc.list_parent_indices(conv).to_numpy().astype(np.int64)
        starts = np.searchsorted(owner, np.arange(len(table)))
        index = np.arange(len(owner)) - starts[owner] if len(owner) else owner
        return cls(
            table,
            owner,
            index,
            flat.field("role").to_pylist(),
            flat.field("text").to_pylist(),
            [x or [] for x in table.column("images").to_pylist()],
            duplicates or {},
        )

    def turns(self, role: str) -> tuple[list[str], np.ndarray]:
        pick = [i for i, r in enumerate(self.roles) if r == role]
        return [self.texts[i] for i in pick], self.turn_owner[pick]


def measure(batch: Batch, cfg: FilterConfig) -> dict[str, np.ndarray]:
    """Every metric of every sample in the batch."""
    n = len(batch.table)
    answers, owner = batch.turns("gpt")
    user, user_owner = batch.turns("human")
    m: dict[str, np.ndarray] = {}
    m.update(txt.answer_shape(answers, owner, n))
    m.update(txt.char_counts(batch.texts, batch.turn_owner, n))
    kinds = batch.table.column("kind").to_pylist()
    m["placeholder_mismatch"] = txt.placeholder_mismatch(
        user,
        user_owner,
        np.array([len(x) for x in batch.images], dtype=np.float64),
        np.array([k == "video" for k in kinds]),
    )

    # Repetition, per answer; a sample gets its worst answer's value.
    fracs = [rep.duplicate_fractions(a, cfg.min_lines, cfg.min_paragraphs) for a in answers]
    m["dup_line_frac"] = _worst([f[0] for f in fracs], owner, n)
    m["dup_para_frac"] = _worst([f[1] for f in fracs], owner, n)
    long_enough = np.array([len(a) >= cfg.repetition_min_chars for a in answers], dtype=bool)
    char_ratio = np.zeros(len(answers))
    if long_enough.any():
        char_ratio[long_enough] = rep.char_repetition_ratios(
            [a for a, ok in zip(answers, long_enough, strict=True) if ok]
        )
    m["char_rep_ratio"] = _worst(char_ratio, owner, n)
    m["word_rep_ratio"] = _worst(rep.word_repetition_ratios(answers), owner, n)
    m["internvl_rep_ratio"] = _worst(rep.internvl_repetition_ratios(answers), owner, n)
    none = rep.TailLoop()
    loops = [
        lp if lp.chars >= cfg.tail_loop_min_chars else none
        for lp in (rep.tail_loop(a) for a in answers)
    ]
    m["tail_loop_repeats"] = _worst([lp.repeats for lp in loops], owner, n)
    m["tail_loop_chars"] = _worst([lp.chars for lp in loops], owner, n)
    by_sample: list[list[str]] = [[] for _ in range(n)]
    for a, o in zip(answers, owner, strict=True):
        by_sample[o].append(a)
    m["repeated_turns"] = np.array(
        [
            rep.repeated_turns(t, cfg.repeated_turn_min_chars) if len(t) > 1 else 0
            for t in by_sample
        ],
        dtype=np.float64,
    )

    ids = batch.table.column("sample_id").to_pylist()
    m["duplicate_of_earlier"] = np.array([float(i in batch.duplicates) for i in ids])
    m.update(img.image_metrics(batch.images, cfg.decode_images, cache=batch.pixels))
    return {k: m[k] for k in METRICS}


def _worst(values, owner: np.ndarray, n: int) -> np.ndarray:
    return ngrams.segment_max(np.asarray(values, dtype=np.float64), owner, n, empty=0.0)


def failures(
    metrics: dict[str, np.ndarray], settings: list[dict[str, ResolvedRule]]
) -> dict[str, np.ndarray]:
    """Rule name -> boolean mask of the samples it fails, given each sample's rule settings."""
    out = {}
    for rule in RULES:
        value = metrics[rule.metric]
        s = [x[rule.name] for x in settings]
        threshold = np.array([r.threshold for r in s], dtype=np.float64)
        enabled = np.array([r.enabled for r in s], dtype=bool)
        with np.errstate(invalid="ignore"):
            fail = value > threshold if rule.op == ">" else value < threshold
        out[rule.name] = fail & enabled & ~np.isnan(value)
    return out


def judge(batch: Batch, metrics: dict[str, np.ndarray], cfg: FilterConfig) -> list[list[Reason]]:
    """Every failed rule of every sample in the batch, in rule order."""
    datasets = batch.table.column("dataset").to_pylist()
    domains = batch.table.column("domain").to_pylist()
    resolved = {key: cfg.resolve(*key) for key in set(zip(datasets, domains, strict=True))}
    settings = [resolved[key] for key in zip(datasets, domains, strict=True)]
    masks = failures(metrics, settings)
    reasons: list[list[Reason]] = [[] for _ in range(len(datasets))]
    for rule in RULES:
        for i in np.flatnonzero(masks[rule.name]):
            r = settings[i][rule.name]
            value = float(metrics[rule.metric][i])
            reasons[i].append(
                Reason(
                    rule.name,
                    r.severity,
                    value,
                    r.threshold,
                    describe(rule.name, batch, int(i), value, r, cfg),
                )
            )
    return reasons


def check_sample(
    sample: dict, cfg: FilterConfig | None = None, duplicate_of: FirstCopy | None = None
) -> tuple[dict[str, float], list[Reason]]:
    """Measure and judge one sample row (SAMPLE_SCHEMA fields): its metrics and its reasons."""
    cfg = cfg or FilterConfig()
    row = {name: sample.get(name) for name in SAMPLE_SCHEMA.names}
    row["images"] = row["images"] or []
    table = pa.Table.from_pylist([row], schema=SAMPLE_SCHEMA)
    dups = {row["sample_id"]: duplicate_of} if duplicate_of else {}
    batch = Batch.of(table, dups)
    metrics = measure(batch, cfg)
    return {k: float(v[0]) for k, v in metrics.items()}, judge(batch, metrics, cfg)[0]


# --- details a reviewer can act on ---------------------------------------------------------


def _clip(s: str, n: int = 60) -> str:
    s = s.replace("\n", "\\n")
    return s if len(s) <= n else s[: n - 1] + "…"


def _turns_of(batch: Batch, i: int) -> range:
    return range(*np.searchsorted(batch.turn_owner, [i, i + 1]))


def _answers_of(batch: Batch, i: int) -> list[tuple[int, str]]:
    return [
        (int(batch.turn_index[k]), batch.texts[k])
        for k in _turns_of(batch, i)
        if batch.roles[k] == "gpt"
    ]


def _mode_note(mode: str) -> str:
    if img.clipped_mode(mode):
        return f" (mode {mode}: convert('RGB') clips it at 255, as the trainer will see it)"
    return ""


def describe(
    rule: str, batch: Batch, i: int, value: float, r: ResolvedRule, cfg: FilterConfig
) -> str:
    """A one-line explanation of why ``rule`` failed sample ``i`` of the batch."""
    base = f"{RULES_BY_NAME[rule].metric} = {value:g} ({r.op} {r.threshold:g})"
    answers = _answers_of(batch, i)
    images = batch.images[i]
    if rule == "empty_answer":
        turns = [k for k, a in answers if not a.strip()]
        return f"{base}: empty assistant turn(s) {turns}"
    if rule == "tail_loop":
        k, a = max(answers, key=lambda ka: rep.tail_loop(ka[1]).chars)
        lp = rep.tail_loop(a)
        return (
            f"{base}: turn {k} ends with «{_clip(lp.span)}» ({lp.period} chars) repeated "
            f"{lp.repeats:.1f}x over its last {lp.chars} chars"
        )
    if rule == "repeated_turns":
        return f"{base}: an answer of >= {cfg.repeated_turn_min_chars} chars given twice"
    if rule in ("control_chars", "replacement_char"):
        pattern = "\ufffd" if rule == "replacement_char" else txt.CONTROL_CHARS
        bad = sorted(
            {
                f"U+{ord(c):04X}"
                for k in _turns_of(batch, i)
                for c in re.findall(pattern, batch.texts[k])
            }
        )
        return f"{base}: {' '.join(bad)}"
    if rule == "duplicate_sample":
        first = batch.duplicates[batch.table.column("sample_id")[i].as_py()]
        return f"same content as {first.dataset}:{first.line} ({first.sample_id})"
    if rule == "image_unreadable":
        return img.unreadable_detail(images, batch.pixels)
    if rule in ("image_too_small", "image_aspect_ratio"):
        sizes = ", ".join(
            f"{im['path'].rsplit('/', 1)[-1]} {im['width']}x{im['height']}" for im in images[:4]
        )
        return f"{base}: {sizes}"
    if rule == "image_clipped":
        modes = [
            f"{im['path']} (mode {batch.pixels[im['path']].mode}, "
            f"{batch.pixels[im['path']].clipped:.1%} clipped)"
            for im in images
            if im["path"] in batch.pixels and batch.pixels[im["path"]].clipped > r.threshold
        ]
        return f"{base}: {', '.join(modes[:4])}"
    if rule == "image_blank":
        blank = [
            im["path"] + _mode_note(batch.pixels[im["path"]].mode)
            for im in images
            if im["path"] in batch.pixels and batch.pixels[im["path"]].std < r.threshold
        ]
        return f"{base}: {', '.join(blank[:4])}"
    if rule in (
        "zero_run",
        "char_run",
        "long_sentence",
        "long_line",
        "answer_too_long",
        "duplicate_lines",
        "duplicate_paragraphs",
        "char_repetition",
        "word_repetition",
        "internvl_repetition",
        "image_in_answer",
    ):
        return f"{base}: {_clip(_worst_answer(rule, answers), 80)}"
    return base


def _worst_answer(rule: str, answers: list[tuple[int, str]]) -> str:
    """A short excerpt of the answer that made ``rule`` fail."""
    if not answers:
        return ""
    if rule == "zero_run":
        k, a = max(answers, key=lambda ka: ka[1].count("0" * 8))
        at = a.find("0" * 8)
        return f"turn {k}: …{a[max(0, at - 20) : at + 20]}…"
    if rule == "image_in_answer":
        k, a = next(((k, a) for k, a in answers if "<image>" in a or "<video>" in a), answers[0])
        return f"turn {k}: {a}"
    k, a = max(answers, key=lambda ka: len(ka[1]))
    return f"turn {k}: {a}"
