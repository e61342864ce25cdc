"""A real-text evaluation corpus for the filters, built from what any Python install holds.

    python bench/corpus.py --seed 0 --clean 2000 --loops 1400 --short 1000 --out corpus.jsonl

Sources (read from this interpreter's site-packages and standard library, sorted, so the same
install and seed give the same corpus): Markdown / reST files and package long descriptions
(``METADATA``), licence texts, Python source (programming), ``pydoc`` renderings of standard
modules (aligned listings full of ``|`` margins), docstring sections with LaTeX ``.. math::``
blocks (mathematics), CSV sample data as Markdown tables and aligned columns (chart), and
licence / README text set as multi-page OCR transcripts with running headers, footers and page
numbers, and tables of contents with dot leaders (ocr).

Three sets, each sample the assistant answer of a text-only conversation:

- ``clean``: windows of whole paragraphs (200 to 4,000 characters, log-uniform) of one source;
- ``short``: first sentences of prose paragraphs (about 100 characters);
- ``loop``: a clean window cut short and ended the way LLM generations loop: a sentence, a list
  item, a code line or a table row repeated to the end; a paragraph given twice; a word or short
  phrase repeated hundreds of times; a number sequence counting on (``loop_kind`` says which).

Each JSONL row: ``{"id", "set", "kind", "loop_kind", "domain", "source", "text"}``.
"""

from __future__ import annotations

import argparse
import json
import math
import pydoc
import random
import re
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

# --- sources -------------------------------------------------------------------------------------

MAX_FILE_BYTES = 400_000
PYDOC_MODULES = (
    "argparse",
    "bisect",
    "calendar",
    "collections",
    "csv",
    "dataclasses",
    "decimal",
    "difflib",
    "enum",
    "fractions",
    "heapq",
    "ipaddress",
    "json",
    "pathlib",
    "queue",
    "shlex",
    "statistics",
    "string",
    "textwrap",
    "uuid",
)
LOOP_KINDS = (
    "sentence",
    "list_item",
    "code_line",
    "table_row",
    "paragraph_twice",
    "phrase",
    "number_sequence",
)


@dataclass(frozen=True, slots=True)
class Source:
    kind: str  # markdown | description | license | code | pydoc | latex | chart | ocr
    domain: str
    name: str
    text: str


def _read(path: Path) -> str | None:
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            return None
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return text.replace("\r\n", "\n").replace("\t", "    ")


def _files(root: Path, pattern: str) -> list[Path]:
    """Files under ``root`` (sorted), not descending into another install's site-packages
    (the standard library folder of some Pythons holds one)."""
    if not root.is_dir():
        return []
    nested = root.name != "site-packages"
    return sorted(
        p
        for p in root.rglob(pattern)
        if p.is_file() and not (nested and "site-packages" in p.relative_to(root).parts)
    )


def _description(metadata: str) -> str:
    """The long description of a METADATA file: the body after the headers, or the
    ``Description:`` header's continuation lines in older metadata."""
    head, _, body = metadata.partition("\n\n")
    if body.strip():
        return body
    m = re.search(r"^Description: (.*(?:\n {8}.*)*)", head, re.M)
    return re.sub(r"\n {8}", "\n", m.group(1)) if m else ""


def _doc_sources(roots: list[Path]) -> Iterator[Source]:
    seen: set[str] = set()
    for root in roots:
        for pattern in ("*.md", "*.rst", "*.markdown", "README*", "METADATA", "LICEN[CS]E*"):
            for path in _files(root, pattern):
                text = _read(path)
                if not text or path.suffix in (".py", ".pyc", ".so"):
                    continue
                if path.name == "METADATA":
                    kind, text = "description", _description(text)
                elif path.name.upper().startswith("LICEN"):
                    kind = "license"
                else:
                    kind = "markdown"
                key = text.strip()
                if len(key) < 200 or key in seen:  # the same README in two places is one source
                    continue
                seen.add(key)
                yield Source(kind, "general", str(path), text)


def _code_sources(stdlib: Path, count: int) -> Iterator[Source]:
    files = [
        p for p in _files(stdlib, "*.py") if "test" not in p.parts and "idlelib" not in p.parts
    ]
    step = max(1, len(files) // count)
    for path in files[::step][:count]:
        text = _read(path)
        if text:
            yield Source("code", "programming", str(path), text)


def _pydoc_sources(modules: tuple[str, ...]) -> Iterator[Source]:
    for name in modules:
        try:
            text = pydoc.render_doc(name, renderer=pydoc.plaintext)
        except Exception:  # noqa: BLE001 - a module this Python lacks is skipped
            continue
        yield Source("pydoc", "programming", f"pydoc:{name}", text)


_MATH = re.compile(r"^( *)\.\. math::[^\n]*\n(?:\1 +[^\n]*\n|[ \t]*\n)+", re.M)


def _latex_sources(roots: list[Path]) -> Iterator[Source]:
    """Docstring sections around reST ``.. math::`` blocks (numpy, scipy, ... source files)."""
    for root in roots:
        for path in _files(root, "*.py"):
            if "tests" in path.parts:
                continue
            text = _read(path)
            if not text or ".. math::" not in text:
                continue
            for k, m in enumerate(_MATH.finditer(text)):
                lo = text.rfind("\n\n", 0, max(0, m.start() - 600))
                hi = text.find("\n\n", min(len(text), m.end() + 300))
                lo = 0 if lo < 0 else lo + 2
                hi = len(text) if hi < 0 else hi
                section = re.sub(r"^ {4,8}", "", text[lo:hi], flags=re.M)
                if '"""' in section:
                    section = section.split('"""')[-1 if section.index(".. math::") > 0 else 0]
                yield Source("latex", "mathematics", f"{path}#{k}", section)


def _csv_tables(roots: list[Path]) -> list[tuple[str, list[list[str]]]]:
    import csv

    out = []
    for root in roots:
        for path in _files(root, "*.csv"):
            text = _read(path)
            if not text:
                continue
            lines = [x for x in text.splitlines() if not x.startswith("#")]
            rows = [r for r in csv.reader(lines) if r]
            if len(rows) < 6 or not any(c.isalpha() for c in "".join(rows[0])):
                continue  # a header naming the columns: chart-like data
            width = len(rows[0])
            rows = [r[:8] for r in rows if len(r) == width]
            cells = [c for r in rows[1:] for c in r]
            if sum(_is_number(c) for c in cells) < 0.6 * len(cells) or "0x" in text:
                continue  # not values one would chart (hex test vectors, text)
            if len(rows) >= 6:
                out.append((str(path), rows))
    return out


def _install_tables(purelib: Path, stdlib: Path) -> list[tuple[str, list[list[str]]]]:
    """Two real tables of this install: packages (files, kilobytes) and standard modules
    (lines, functions, classes)."""
    packages = [["Package", "Version", "Files", "Size (KB)"]]
    for record in _files(purelib, "RECORD"):
        name, _, version = record.parent.name.removesuffix(".dist-info").partition("-")
        sizes = [x.rsplit(",", 1)[-1] for x in (_read(record) or "").splitlines()]
        kb = sum(int(x) for x in sizes if x.isdigit()) / 1024
        packages.append([name, version, str(len(sizes)), f"{kb:.1f}"])
    modules = [["Module", "Lines", "Functions", "Classes"]]
    for path in _files(stdlib, "*.py")[:400]:
        text = _read(path) or ""
        modules.append(
            [
                path.stem,
                str(text.count("\n")),
                str(len(re.findall(r"^\s*def ", text, re.M))),
                str(len(re.findall(r"^\s*class ", text, re.M))),
            ]
        )
    return [(str(purelib), packages), (str(stdlib), modules)]


def _chart_sources(roots: list[Path], rng: random.Random, count: int) -> Iterator[Source]:
    """Chart-to-table answers: windows of CSV rows as Markdown tables, aligned columns, or
    ``label: value`` lines."""
    tables = _csv_tables(roots) + _install_tables(roots[0], roots[-1])
    tables = [(name, rows) for name, rows in tables if len(rows) >= 6]  # header + 5 rows
    for k in range(count if tables else 0):
        name, rows = tables[k % len(tables)]
        head, body = rows[0], rows[1:]
        n = rng.randint(4, min(40, len(body)))
        start = rng.randrange(0, len(body) - n + 1)
        part = [[_short_number(c) for c in r] for r in body[start : start + n]]
        style = rng.choice(("markdown", "aligned", "lines"))
        if style == "markdown":
            lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(r) + " |" for r in part]
        elif style == "aligned":
            widths = [max(len(x) for x in col) for col in zip(head, *part, strict=True)]
            lines = [
                "  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in [head, *part]
            ]
            lines.insert(1, "  ".join("-" * w for w in widths))
        else:
            lines = [", ".join(f"{h}: {c}" for h, c in zip(head, r, strict=True)) for r in part]
        intro = f"The chart shows {', '.join(head[:-1])} and {head[-1]} for {n} entries."
        yield Source("chart", "chart", f"{name}:{start}", intro + "\n\n" + "\n".join(lines))


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _short_number(cell: str) -> str:
    try:
        x = float(cell)
    except ValueError:
        return cell
    return f"{x:.4g}" if "." in cell or "e" in cell.lower() else cell


def _ocr_sources(docs: list[Source], rng: random.Random, count: int) -> Iterator[Source]:
    """OCR transcripts: real text reflowed into pages with a running header, a footer with
    the page number, and (one in four) a table of contents with dot leaders."""
    prose = [d for d in docs if d.kind in ("license", "description", "markdown")]
    for k in range(count if prose else 0):
        doc = prose[rng.randrange(len(prose))]
        lines = [x.strip() for x in doc.text.splitlines() if x.strip()]
        title = (lines[0] if lines else "Document")[:60]
        if k % 4 == 0:
            heads = [x for x in lines if 3 < len(x) < 60 and x[0].isupper()][:20]
            width = rng.choice((60, 72, 80))
            page, toc = 1, ["CONTENTS", ""]
            for h in heads:
                page += rng.randint(1, 6)
                toc.append(f"{h} {'.' * max(3, width - len(h) - len(str(page)) - 2)} {page}")
            yield Source("ocr", "ocr", f"toc:{doc.name}", "\n".join(toc))
            continue
        per_page = rng.randint(6, 25)
        start = rng.randrange(0, max(1, len(lines) - per_page))
        pages = rng.randint(2, 5)
        out = []
        for p in range(pages):
            body = lines[start + p * per_page : start + (p + 1) * per_page]
            if not body:
                break
            out += [title.upper(), ""] + body + ["", f"Page {p + 1 + start // per_page}"]
            out.append("")
        yield Source("ocr", "ocr", f"ocr:{doc.name}", "\n".join(out))


def collect(
    seed: int,
    purelib: Path | None = None,
    stdlib: Path | None = None,
    pydoc_modules: tuple[str, ...] = PYDOC_MODULES,
) -> list[Source]:
    """Every source of an install (default: this interpreter's site-packages and standard
    library), in a fixed order; ``seed`` only picks chart windows and OCR layouts."""
    paths = sysconfig.get_paths()
    purelib = purelib or Path(paths["purelib"])
    stdlib = stdlib or Path(paths["stdlib"])
    roots = [purelib, stdlib]
    rng = random.Random(seed ^ 0x5EED)
    docs = list(_doc_sources(roots))
    out = docs + list(_code_sources(stdlib, 150)) + list(_pydoc_sources(pydoc_modules))
    out += list(_latex_sources([purelib]))
    out += list(_chart_sources(roots, rng, 300))
    out += list(_ocr_sources(docs, rng, 300))
    return out


# --- windows ---------------------------------------------------------------------------------

_BLOCKS = re.compile(r"\n[ \t]*\n")
_SENTENCE = re.compile(r"[^.!?\n]*[A-Za-z][^.!?\n]*[.!?](?=\s|$)")


def window(src: Source, rng: random.Random, lo: int = 200, hi: int = 4000) -> str | None:
    """Whole paragraphs of ``src`` adding up to a log-uniform length in [lo, hi]."""
    if src.kind in ("chart", "ocr"):  # made to size: a whole table or transcript
        return src.text.strip("\n")
    blocks = [b for b in _BLOCKS.split(src.text) if b.strip()]
    if not blocks:
        return None
    target = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    i = rng.randrange(len(blocks))
    out: list[str] = []
    while i < len(blocks) and sum(len(b) + 2 for b in out) < target:
        out.append(blocks[i].rstrip())
        i += 1
    text = "\n\n".join(out).strip("\n")
    if len(text) > 2 * hi:  # one huge block (a minified file, a long table)
        text = text[: text.rfind("\n", 0, 2 * hi)] if "\n" in text[: 2 * hi] else text[: 2 * hi]
    letters = sum(c.isalnum() for c in text)
    return text if len(text) >= lo // 2 and letters >= 0.3 * len(text) else None


def short_answer(src: Source, rng: random.Random) -> str | None:
    """The first sentence(s) of a prose paragraph, about 100 characters."""
    blocks = [b.strip() for b in _BLOCKS.split(src.text) if b.strip()]
    prose = [b for b in blocks if b[:1].isalpha() and "  " not in b and b.count("\n") < 8]
    if not prose:
        return None
    text = " ".join(prose[rng.randrange(len(prose))].split())
    sentences = _SENTENCE.findall(text)
    out = ""
    for s in sentences:
        out = (out + " " + s.strip()).strip()
        if len(out) >= 60:
            break
    return out if 20 <= len(out) <= 220 else None


# --- loops -----------------------------------------------------------------------------------


MIN_LOOP_CHARS = 100  # a loop running to the end of a generation: >= ~25 tokens


def _repeats(rng: random.Random, unit: str, lo: int = 5, hi: int = 80) -> int:
    """Copies of ``unit``: log-uniform in [lo, hi], and enough to cover MIN_LOOP_CHARS."""
    k = int(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    return max(k, -(-MIN_LOOP_CHARS // max(1, len(unit))))


def _cut(text: str, rng: random.Random, at: str = "\n") -> str:
    """The text up to a boundary between 30% and 100% of it."""
    lo = int(len(text) * 0.3)
    k = text.find(at, rng.randint(lo, len(text)))
    return text if k < 0 else text[:k]


def _maybe_cut_mid_span(text: str, unit: str, rng: random.Random) -> str:
    """Half of the loops stop mid-span, as a generation hitting its token limit does."""
    if rng.random() < 0.5 and len(unit) > 2:
        return text[: len(text) - rng.randint(1, len(unit) - 1)]
    return text


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE.findall(text) if len(s.strip()) >= 20]


def loop_sentence(text: str, rng: random.Random) -> str | None:
    head = _cut(text, rng, ". ")
    pool = _sentences(head) or _sentences(text)
    if not pool:
        return None
    s = pool[-1] if rng.random() < 0.6 else rng.choice(pool)
    unit = " " + s
    head = head.rstrip() + "." * (not head.endswith("."))
    return _maybe_cut_mid_span(head + unit * _repeats(rng, unit), unit, rng)


_LIST_ITEM = re.compile(r"^[ \t]*(?:[-*+•]|\d+[.)])[ \t]+\S.*$", re.M)


def loop_list_item(text: str, rng: random.Random) -> str | None:
    items = _LIST_ITEM.findall(text)
    if items:
        item = rng.choice(items)
    else:
        pool = _sentences(text)
        if not pool:
            return None
        item = rng.choice(("- ", "* ", "1. ")) + rng.choice(pool)
    head = _cut(text, rng)
    m = re.match(r"^([ \t]*)(\d+)([.)].*)$", item)
    k = _repeats(rng, item + "\n")
    if m and rng.random() < 0.5:  # the number counts on, the text repeats
        first = int(m.group(2))
        lines = [f"{m.group(1)}{first + i}{m.group(3)}" for i in range(k)]
    else:
        lines = [item] * k
    return _maybe_cut_mid_span(head + "\n" + "\n".join(lines), item, rng)


def loop_code_line(text: str, rng: random.Random) -> str | None:
    lines = [x for x in text.splitlines() if len(x.strip()) >= 4]
    if not lines:
        return None
    line = rng.choice(lines)
    head = _cut(text, rng)
    return _maybe_cut_mid_span(head + ("\n" + line) * _repeats(rng, line + "\n"), line, rng)


def loop_table_row(text: str, rng: random.Random) -> str | None:
    rows = [x for x in text.splitlines() if x.count("|") >= 2 and any(c.isalnum() for c in x)]
    head = _cut(text, rng)
    if rows:
        row = rng.choice(rows)
    else:
        words = [w for w in re.findall(r"[A-Za-z]{3,}", text)][:40] or ["value"]
        cells = [rng.choice(words) for _ in range(rng.randint(2, 4))] + [str(rng.randint(1, 999))]
        row = "| " + " | ".join(cells) + " |"
    return _maybe_cut_mid_span(head + ("\n" + row) * _repeats(rng, row + "\n"), row, rng)


def loop_paragraph_twice(text: str, rng: random.Random) -> str | None:
    """A paragraph (of >= 60 letters) given again right after itself; the answer ends
    there, or (three times in ten) goes on with the rest of the window."""
    blocks = [b for b in _BLOCKS.split(text) if b.strip()]
    long = [k for k, b in enumerate(blocks) if sum(c.isalpha() for c in b) >= 60]
    if not long:
        return None
    k = rng.choice(long)
    out = blocks[: k + 1] + [blocks[k]]
    if rng.random() < 0.3:
        out += blocks[k + 1 :]
    return "\n\n".join(out)


def loop_phrase(text: str, rng: random.Random) -> str | None:
    words = re.findall(r"[A-Za-z]+", text)
    if not words:
        return None
    i = rng.randrange(len(words))
    phrase = " ".join(words[i : i + rng.choice((1, 1, 2, 3))])
    sep = rng.choice((" ", " ", ", ", "\n"))
    head = _cut(text, rng, " ")
    n = rng.randint(100, 800)
    return head + " " + sep.join([phrase] * n)


def loop_number_sequence(text: str, rng: random.Random) -> str | None:
    head = _cut(text, rng)
    start, step = rng.randint(0, 500), rng.choice((1, 1, 1, 2, 5, 10))
    n = rng.randint(40, 400)
    values = [start + i * step for i in range(n)]
    style = rng.randrange(5)
    if style == 0:
        body = ", ".join(map(str, values))
    elif style == 1:
        body = "\n".join(f"{v}." for v in values)
    elif style == 2:
        scale = rng.choice((10, 100))
        body = " ".join(f"{v / scale:.{len(str(scale)) - 1}f}" for v in values)
    elif style == 3:
        body = " ".join(f"[{v}]" for v in values)
    else:
        body = "\n".join(f"{v}" for v in values)
    return head + "\n" + body


LOOPS: dict[str, Callable[[str, random.Random], str | None]] = {
    "sentence": loop_sentence,
    "list_item": loop_list_item,
    "code_line": loop_code_line,
    "table_row": loop_table_row,
    "paragraph_twice": loop_paragraph_twice,
    "phrase": loop_phrase,
    "number_sequence": loop_number_sequence,
}

# Share of each source kind among sampled windows.
KIND_WEIGHTS = {
    "markdown": 0.27,
    "description": 0.2,
    "license": 0.05,
    "code": 0.13,
    "pydoc": 0.05,
    "latex": 0.08,
    "chart": 0.1,
    "ocr": 0.12,
}

SHORT_WEIGHTS = {"markdown": 0.5, "description": 0.4, "license": 0.1}


def build(seed: int, clean: int, loops: int, short: int, sources: list[Source] | None = None):
    """The corpus rows, deterministic for ``seed`` on one Python install."""
    sources = sources if sources is not None else collect(seed)
    by_kind: dict[str, list[Source]] = {}
    for s in sources:
        by_kind.setdefault(s.kind, []).append(s)
    kinds = [k for k in KIND_WEIGHTS if by_kind.get(k)]
    weights = [KIND_WEIGHTS[k] for k in kinds]
    rng = random.Random(seed)
    rows: list[dict] = []

    def pick() -> Source:
        kind = rng.choices(kinds, weights)[0]
        return by_kind[kind][rng.randrange(len(by_kind[kind]))]

    def add(set_: str, src: Source, text: str, loop_kind: str = "") -> None:
        rows.append(
            {
                "id": len(rows),
                "set": set_,
                "kind": src.kind,
                "loop_kind": loop_kind,
                "domain": src.domain,
                "source": src.name,
                "text": text,
            }
        )

    def fill(set_: str, count: int, make) -> None:
        done = tries = 0
        while done < count and tries < count * 50:
            tries += 1
            src = pick()
            got = make(src)
            if got:
                add(set_, src, *got)
                done += 1

    fill("clean", clean, lambda s: (lambda t: (t,) if t else None)(window(s, rng)))

    short_kinds = [k for k in SHORT_WEIGHTS if by_kind.get(k)]
    done = tries = 0
    while done < short and tries < short * 50:
        tries += 1
        kind = rng.choices(short_kinds, [SHORT_WEIGHTS[k] for k in short_kinds])[0]
        src = by_kind[kind][rng.randrange(len(by_kind[kind]))]
        t = short_answer(src, rng)
        if t:
            add("short", src, t)
            done += 1

    def make_loop(src: Source):
        kind = LOOP_KINDS[len([r for r in rows if r["set"] == "loop"]) % len(LOOP_KINDS)]
        base = window(src, rng, 200, 3000)
        text = LOOPS[kind](base, rng) if base else None
        return (text, kind) if text else None

    fill("loop", loops, make_loop)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clean", type=int, default=2000)
    ap.add_argument("--loops", type=int, default=1400)
    ap.add_argument("--short", type=int, default=1000)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    rows = build(args.seed, args.clean, args.loops, args.short)
    with args.out.open("w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    counts: dict[str, int] = {}
    for r in rows:
        key = f"{r['set']}:{r['loop_kind'] or r['kind']}"
        counts[key] = counts.get(key, 0) + 1
    print(f"{len(rows)} rows -> {args.out}")
    for k in sorted(counts):
        print(f"  {k}: {counts[k]}")


if __name__ == "__main__":
    main()
