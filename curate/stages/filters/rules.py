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
from curate.stages.filters import language as lang
from curate.stages.filters import layout, loops, ngrams
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
    "repeated_para_chars",
    "char_rep_ratio",
    "word_rep_ratio",
    "internvl_rep_ratio",
    "tail_loop_repeats",
    "tail_loop_chars",
    "counting_loop_items",
    "repeated_turns",
    "duplicate_of_earlier",
    "min_image_side",
    "max_aspect_ratio",
    "unreadable_images",
    "min_image_std",
    "max_clipped_share",
    "language_mismatch",
    "mixed_script_words",
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
    pixels: img.PixelCache = field(default_factory=img.PixelCache)
    # What ``measure`` found per assistant turn (by turn index), for the details.
    loops: dict[int, tuple[loops.TailLoop, loops.CountingLoop]] = field(default_factory=dict)
    languages: list[str] = field(default_factory=list)  # per sample, when measured
    _turn_ranges: np.ndarray | None = None

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
        texts, owner, _ = self.turns_at(role)
        return texts, owner

    def turns_at(self, role: str) -> tuple[list[str], np.ndarray, list[int]]:
        """The turns of ``role``: texts, samples and turn indices."""
        pick = [i for i, r in enumerate(self.roles) if r == role]
        return [self.texts[i] for i in pick], self.turn_owner[pick], pick

    def turn_range(self, i: int) -> range:
        """The turns of sample ``i``."""
        if self._turn_ranges is None:
            self._turn_ranges = np.searchsorted(self.turn_owner, np.arange(len(self.table) + 1))
        return range(int(self._turn_ranges[i]), int(self._turn_ranges[i + 1]))


def measure(batch: Batch, cfg: FilterConfig) -> dict[str, np.ndarray]:
    """Every metric of every sample in the batch."""
    n = len(batch.table)
    answers, owner, at = batch.turns_at("gpt")
    user, user_owner = batch.turns("human")
    m: dict[str, np.ndarray] = {}
    per_answer = _answer_metrics(answers, cfg)
    batch.loops = dict(zip(at, per_answer.pop("loops"), strict=True))
    # Counts add up over a sample's answers; every other metric is its worst answer's.
    m["empty_answers"] = np.bincount(owner, weights=per_answer.pop("empty_answer"), minlength=n)
    m["answer_placeholders"] = np.bincount(
        owner, weights=per_answer.pop("placeholders"), minlength=n
    )
    for k, v in per_answer.items():
        m[k] = _worst(v, owner, n)
    m.update(txt.char_counts(batch.texts, batch.turn_owner, n))
    kinds = batch.table.column("kind").to_pylist()
    m["placeholder_mismatch"] = txt.placeholder_mismatch(
        user,
        user_owner,
        np.array([len(x) for x in batch.images], dtype=np.float64),
        np.array([k == "video" for k in kinds]),
    )

    m["internvl_rep_ratio"] = (
        _worst(rep.internvl_repetition_ratios(answers), owner, n)
        if _enabled(batch, cfg, "internvl_repetition")
        else np.full(n, np.nan)  # off: not measured
    )
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

    m.update(_language_metrics(batch, cfg, answers, owner, user, user_owner, n))
    ids = batch.table.column("sample_id").to_pylist()
    m["duplicate_of_earlier"] = np.array([float(i in batch.duplicates) for i in ids])
    m.update(img.image_metrics(batch.images, cfg.decode_images, batch.pixels))
    return {k: m[k] for k in METRICS}


def _answer_metrics(answers: list[str], cfg: FilterConfig) -> dict:
    """Every per-answer metric: text shape, repetition of content and loops. The answers are
    scanned chunk by chunk (arrays that fit in the CPU cache), each scan shared by the shape
    and content measures."""
    shape = txt.answer_shape(answers)
    out = {
        "empty_answer": shape["empty_answers"],
        "placeholders": shape["answer_placeholders"],
        "max_answer_chars": shape["max_answer_chars"],
    }
    out.update({k: np.zeros(len(answers)) for k in txt.SHAPE_METRICS + rep.CONTENT_METRICS})
    for part in ngrams.chunks(answers):
        sc = layout.scan(answers[part])
        found = txt.shape(sc)
        found.update(
            rep.content_measures(
                layout.content_view(sc),
                cfg.repetition_min_chars,
                cfg.min_lines,
                cfg.min_paragraphs,
                cfg.min_line_chars,
            )
        )
        for k, v in found.items():
            out[k][part] = v
    found_loops = [_loop_of(a, cfg) for a in answers]
    out["tail_loop_repeats"] = np.array([lp.repeats for lp, _ in found_loops], dtype=float)
    out["tail_loop_chars"] = np.array([lp.chars for lp, _ in found_loops], dtype=float)
    out["counting_loop_items"] = np.array([c.items for _, c in found_loops], dtype=float)
    out["loops"] = found_loops
    return out


# Beyond this many copies a plain loop is taken as found; below it, the answer may still be
# counting on (``7. Step``, ``8. Step``), which only the slower counting check sees.
PLAIN_LOOP_REPEATS = 3


def _loop_of(answer: str, cfg: FilterConfig) -> tuple[loops.TailLoop, loops.CountingLoop]:
    """The answer's tail loop and counting loop, as the rules read them.

    A tail loop counts when its span has content, or when whole layout lines repeat (a table
    border or separator line emitted again and again), and covers >= ``tail_loop_min_chars``.
    A counting template with words (``Step 7: …``) is a tail loop; one of numbers only
    (``1, 2, 3, …``) is a counting loop.
    """
    lp = loops.tail_loop(answer)
    if lp.chars < cfg.tail_loop_min_chars or not (lp.content or lp.line_loop):
        lp = loops.TailLoop()
    if lp.repeats > PLAIN_LOOP_REPEATS:  # a clear plain loop: counting on would add nothing
        return lp, loops.CountingLoop()
    count = loops.counting_loop(answer)
    if count.chars < cfg.tail_loop_min_chars:
        return lp, loops.CountingLoop()
    if count.content:
        if count.repeats > lp.repeats:
            lp = loops.TailLoop(count.repeats, len(count.span), count.chars, count.span, True)
        return lp, loops.CountingLoop()
    return lp, count


def _language_metrics(batch, cfg, answers, owner, user, user_owner, n) -> dict[str, np.ndarray]:
    """The two language measures, each only where its rule is on somewhere in the batch (the
    detector costs; NaN: not measured)."""
    out = {k: np.full(n, np.nan) for k in ("language_mismatch", "mixed_script_words")}
    if _enabled(batch, cfg, "mixed_script"):
        out["mixed_script_words"] = _worst([lang.mixed_script_share(a) for a in answers], owner, n)
    if _enabled(batch, cfg, "language_mismatch"):
        questions, replies = [""] * n, [""] * n
        for text, o in zip(user, user_owner, strict=True):
            questions[o] += text + "\n"
        for text, o in zip(answers, owner, strict=True):
            replies[o] += text + "\n"
        values, batch.languages = lang.mismatches(questions, replies)
        out["language_mismatch"] = np.asarray(values, dtype=np.float64)
    return out


def _enabled(batch: Batch, cfg: FilterConfig, rule: str) -> bool:
    """Whether ``rule`` is on for any sample of the batch (off everywhere: skip its metric)."""
    keys = set(
        zip(
            batch.table.column("dataset").to_pylist(),
            batch.table.column("domain").to_pylist(),
            strict=True,
        )
    )
    return any(cfg.resolve(*key)[rule].enabled for key in keys)


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


def _answers_of(batch: Batch, i: int) -> list[tuple[int, str]]:
    return [
        (int(batch.turn_index[k]), batch.texts[k])
        for k in batch.turn_range(i)
        if batch.roles[k] == "gpt"
    ]


def _loops_of(batch: Batch, i: int) -> list[tuple[int, loops.TailLoop, loops.CountingLoop]]:
    """The loops ``measure`` found in sample ``i``'s answers: (turn, tail loop, counting)."""
    return [
        (int(batch.turn_index[k]), *batch.loops[k]) for k in batch.turn_range(i) if k in batch.loops
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
    if rule == "language_mismatch":
        return f"{base}: {batch.languages[i]}"
    if rule == "mixed_script":
        words = [w for _, a in answers for w in lang.mixed_words(a)]
        return f"{base}: {', '.join(_clip(w, 30) for w in words[:5])}"
    if rule == "empty_answer":
        turns = [k for k, a in answers if not a.strip()]
        return f"{base}: empty assistant turn(s) {turns}"
    if rule == "tail_loop":
        k, lp, _ = max(_loops_of(batch, i), key=lambda x: x[1].repeats)
        return (
            f"{base}: turn {k} ends with «{_clip(lp.span)}» ({lp.period} chars) repeated "
            f"{lp.repeats:.1f}x over its last {lp.chars} chars"
        )
    if rule == "counting_loop":
        k, _, c = max(_loops_of(batch, i), key=lambda x: x[2].items)
        return f"{base}: turn {k} ends counting on, «{_clip(c.span)}» {c.items} times"
    if rule == "repeated_paragraph":
        k, para = _repeated_paragraph(answers)
        return f"{base}: turn {k} gives «{_clip(para)}» twice in a row"
    if rule == "repeated_turns":
        return f"{base}: an answer of >= {cfg.repeated_turn_min_chars} chars given twice"
    if rule in ("control_chars", "replacement_char"):
        pattern = "\ufffd" if rule == "replacement_char" else txt.CONTROL_CHARS
        bad = sorted(
            {
                f"U+{ord(c):04X}"
                for k in batch.turn_range(i)
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


_WORDS = re.compile(r"[^\W_]+")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")


def _repeated_paragraph(answers: list[tuple[int, str]]) -> tuple[int, str]:
    """The longest paragraph an answer gives twice in a row (its content, for the detail)."""
    best = (answers[0][0] if answers else 0, "")
    for k, a in answers:
        paras = [" ".join(_WORDS.findall(p.lower())) for p in _PARAGRAPH_BREAK.split(a)]
        paras = [p for p in paras if p]
        for x, y in zip(paras, paras[1:], strict=False):
            if x == y and len(x) > len(best[1]):
                best = (k, x)
    return best


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
