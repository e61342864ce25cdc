"""``curate demo make DIR``: a small, realistic InternVL-style mixture with planted bad samples.

Eight datasets over six domains (single image, multi-image with ``Image-k:`` labels, video
frames, text only), images of many sizes and aspect ratios, and the bad samples every later
stage must catch; near-duplicates (text and images) and a small local benchmark
(``benchmarks/demo_bench.parquet``) with a few items leaked into the training data, with the
near-misses that must not be caught. Deterministic for a seed.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from curate.demo import images as img
from curate.demo import text as txt

# Sizes (w, h) photos are drawn at: 4:3, 16:9, portrait, square, panorama, very tall, tiny.
PHOTO_SIZES = [
    (1024, 768),
    (1280, 720),
    (600, 900),
    (800, 800),
    (2400, 300),
    (300, 1800),
    (640, 500),
    (448, 448),
    (96, 64),
    (1600, 1200),
]


@dataclass
class DemoDataset:
    name: str
    domain: str
    max_dynamic_patch: int = 12
    repeat_time: float = 1.0
    data_augment: bool = False
    lines: list[bytes] = field(default_factory=list)

    @property
    def root(self) -> str:
        return f"images/{self.name}"

    def add(self, record: dict) -> None:
        self.lines.append(orjson.dumps(record))


def _conv(question: str, answer: str, prefix: str = "<image>\n") -> list[dict]:
    return [{"from": "human", "value": prefix + question}, {"from": "gpt", "value": answer}]


def _general(out: Path, rng: random.Random, n: int) -> DemoDataset:
    ds = DemoDataset("general_vqa", "general", data_augment=True)
    for i in range(n):
        w, h = PHOTO_SIZES[i % len(PHOTO_SIZES)]
        name = f"photo_{i:04d}.jpg"
        img.save(img.photo(rng, w, h), out / ds.root / name)
        q, a = txt.general_qa(rng)
        ds.add({"id": i, "image": name, "width": w, "height": h, "conversations": _conv(q, a)})
    for k, side in enumerate((24, 32, 48)):  # tiny icons
        name = f"icon_{k}.png"
        img.save(img.icon(rng, side), out / ds.root / name)
        ds.add(
            {
                "id": f"icon{k}",
                "image": name,
                "conversations": _conv("What shape is shown?", "An orange circle."),
            }
        )
    return ds


def _charts(out: Path, rng: random.Random, n: int) -> DemoDataset:
    ds = DemoDataset("chart_qa", "chart", max_dynamic_patch=6)
    for i in range(n):
        labels = rng.sample(["A", "B", "C", "D", "E", "F", "G"], rng.randint(3, 6))
        values = [rng.randint(5, 95) for _ in labels]
        name = f"chart_{i:04d}.png"
        img.save(img.chart(rng, labels, values), out / ds.root / name)
        ds.add({"id": i, "image": name, "conversations": _conv(*txt.chart_qa(rng, labels, values))})
    return ds


def _documents(out: Path, rng: random.Random, n: int) -> DemoDataset:
    ds = DemoDataset("doc_ocr", "ocr", repeat_time=2)
    for i in range(n):
        lines = txt.document_lines(rng, rng.randint(8, 20))
        name = f"doc_{i:04d}.png"
        img.save(img.document(lines), out / ds.root / name)
        ds.add({"id": i, "image": name, "conversations": _conv(*txt.ocr_qa(lines))})
    return ds


def _multi_image(out: Path, rng: random.Random, n: int) -> DemoDataset:
    ds = DemoDataset("multi_image_compare", "general")
    for i in range(n):
        k = rng.randint(2, 4)
        names = []
        for j in range(k):
            w, h = rng.choice(PHOTO_SIZES[:8])
            names.append(f"m{i:04d}_{j}.jpg")
            img.save(img.photo(rng, w // 2, h // 2), out / ds.root / names[-1])
        labels = "".join(f"Image-{j + 1}: <image>\n" for j in range(k))
        answer = " ".join(f"Image-{j + 1} shows: {txt.sentence(rng)}" for j in range(k))
        ds.add(
            {
                "id": i,
                "image": names,
                "conversations": _conv("What differs between these images?", answer, prefix=labels),
            }
        )
    return ds


def _video(out: Path, rng: random.Random, n: int) -> DemoDataset:
    ds = DemoDataset("video_caption", "general")
    for i in range(n):
        folder = f"clip_{i:03d}"
        for f in range(rng.randint(6, 16)):
            img.save(img.photo(rng, 320, 240), out / ds.root / folder / f"frame_{f + 1}.jpg")
        ds.add(
            {
                "id": i,
                "video": folder,
                "conversations": _conv(
                    "Describe what happens in the video.", txt.paragraph(rng, 3), prefix="<video>\n"
                ),
            }
        )
    return ds


def _text(
    name: str, domain: str, gen: Callable, rng: random.Random, n: int, repeat_time: float = 1.0
) -> DemoDataset:
    ds = DemoDataset(name, domain, repeat_time=repeat_time)
    for i in range(n):
        q, a = gen(rng)
        ds.add({"id": i, "conversations": _conv(q, a, prefix="")})
    return ds


def _plant_bad_samples(out: Path, rng: random.Random, by_name: dict[str, DemoDataset]) -> None:
    """The bad samples the pipeline must report (each with its own reason), never crash on."""
    gen, math, ocr = by_name["general_vqa"], by_name["math_text"], by_name["doc_ocr"]
    multi = by_name["multi_image_compare"]
    root = out / gen.root
    img.write_truncated_jpeg(img.photo(rng, 800, 600), root / "bad_truncated.jpg")
    img.write_garbage(root / "bad_garbage.jpg", rng)
    (root / "bad_empty.jpg").write_bytes(b"")
    img.write_png_bomb(root / "bad_bomb.png")
    img.save(img.blank(640, 480), root / "bad_blank.png")
    img.save(img.photo(rng, 2000, 100), root / "bad_sliver.jpg")
    for name in (
        "bad_truncated.jpg",
        "bad_garbage.jpg",
        "bad_empty.jpg",
        "bad_bomb.png",
        "missing.jpg",
        "../../meta.json",
        "bad_blank.png",
        "bad_sliver.jpg",
    ):
        gen.add({"id": f"bad:{name}", "image": name, "conversations": _conv(*txt.general_qa(rng))})
    gen.add(
        {
            "id": "bad:empty_answer",
            "image": "photo_0000.jpg",
            "conversations": _conv("Describe the image.", "   "),
        }
    )
    gen.add(
        {
            "id": "bad:loop",
            "image": "photo_0001.jpg",
            "conversations": _conv("Describe the image.", txt.generation_loop(rng)),
        }
    )
    gen.add(
        {
            "id": "bad:image_in_answer",
            "image": "photo_0002.jpg",
            "conversations": _conv(
                "Describe the image.", "Here it is: <image> " + txt.sentence(rng)
            ),
        }
    )
    multi.add(
        {
            "id": "bad:count",
            "image": ["m0000_0.jpg", "m0000_1.jpg"],
            "conversations": _conv("Compare them.", txt.sentence(rng), prefix="Image-1: <image>\n"),
        }
    )
    q, a = txt.math_qa(rng)
    math.add({"id": "bad:zeros", "conversations": _conv(q, a + " 1" + "0" * 120 + ".", prefix="")})
    dup_lines = "\n".join([txt.sentence(rng)] * 12)
    ocr.add(
        {
            "id": "bad:dup_lines",
            "image": "doc_0000.png",
            "conversations": _conv("Transcribe all the text in this document.", dup_lines),
        }
    )
    math.lines.append(math.lines[0])  # an exact duplicate sample
    math.lines.append(
        b'{"id": "bad:json", "conversations": [{"from": "human", "value": "unterminated'
    )
    math.lines.append(b'{"id": "bad:utf8", "conversations": "\xff\xfe broken bytes"}')
    math.add({"id": "bad:one_sided", "conversations": [{"from": "human", "value": "Hello?"}]})
    math.add(
        {
            "id": "bad:ctrl",
            "conversations": _conv("What is 2+2?", "It is 4.\x00\x07\ufffd", prefix=""),
        }
    )


# The planted near-duplicates and leaks draw from their own random stream, so every other demo
# sample (and every count earlier tests were written against) stays as it was.
PLANTED_SEED = 7919

# Benchmark questions: long enough (>= 13 words) for the 13-gram text check.
BENCH_QUESTIONS = [
    "Looking at the picture, which of the coloured shapes lies closest to the upper left "
    "corner of the frame?",
    "How many separate shapes can be counted in this image, and which colour covers the "
    "largest area of it?",
    "Is the background of this picture brighter at the top or at the bottom, and how can "
    "you tell from the gradient?",
    "Describe the position of the largest rectangle relative to the centre of the image and "
    "name its colour precisely.",
    "Which two shapes in this picture overlap each other, and which of the two is drawn on "
    "top of the other one?",
    "Estimate what fraction of the whole image is covered by circles and ellipses rather "
    "than by the background gradient.",
]


def _bench_item(i: int, question: str, image: bytes) -> dict:
    return {"id": f"demo-{i:03d}", "question": question, "answer": "A", "image": image}


def _make_benchmark(out: Path, rng: random.Random) -> list[tuple[bytes, str]]:
    """``benchmarks/demo_bench.parquet``: six items (HF-style image bytes, question, id);
    returns each item's (image bytes, question)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    items = [(img.jpeg_bytes(img.scene(rng, 640, 480), quality=90), q) for q in BENCH_QUESTIONS]
    rows = [_bench_item(i, q, b) for i, (b, q) in enumerate(items)]
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "id": [r["id"] for r in rows],
            "question": [r["question"] for r in rows],
            "answer": [r["answer"] for r in rows],
            "image": pa.array([{"bytes": r["image"], "path": None} for r in rows], image_type),
        }
    )
    path = out / "benchmarks" / "demo_bench.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return items


def _reword(text: str, swaps: dict[str, str]) -> str:
    for a, b in swaps.items():
        text = text.replace(a, b, 1)
    return text


def _plant_near_duplicates(out: Path, rng: random.Random, by_name: dict[str, DemoDataset]) -> None:
    """Near-duplicates the neardup step must find, near-misses it must not, and benchmark
    leaks the decontaminate step must find. Every planted id starts with ``nd:`` (a
    near-duplicate copy), ``nm:`` (a near-miss) or ``leak:``."""
    gen, sci, math = by_name["general_vqa"], by_name["science_text"], by_name["math_text"]
    code = by_name["code_text"]
    # Text only. Whitespace and punctuation edits, across datasets.
    # (Datasets in meta order: math_text, code_text, science_text; the first copy is kept.)
    q, a = "Explain one key idea from astronomy in simple words.", txt.paragraph(rng, 4)
    math.add({"id": "nd:base_whitespace", "conversations": _conv(q, a, prefix="")})
    edited = a.replace(". ", " .  ").replace(" a ", " a\n", 1).rstrip(".") + "!"
    sci.add({"id": "nd:whitespace", "conversations": _conv(q.replace(" ", "  "), edited, "")})
    # Reordered turns.
    (q1, a1), (q2, a2) = txt.science_qa(rng), txt.general_qa(rng)
    two = _conv(q1, a1, prefix="") + _conv(q2 + " Answer in prose.", a2, prefix="")
    sci.add({"id": "nd:base_turns", "conversations": two})
    sci.add({"id": "nd:reordered", "conversations": two[2:] + two[:2]})
    # A reworded answer (two sentences begin with other words), and a near-miss: the same question
    # with another answer.
    q, a = "Explain one key idea from geography in simple words.", txt.paragraph(rng, 5)
    code.add({"id": "nd:base_reworded", "conversations": _conv(q, a, prefix="")})
    reworded = _reword(a, {"A ": "One ", ". A ": ". Another "})
    sci.add({"id": "nd:reworded", "conversations": _conv(q, reworded, prefix="")})
    sci.add({"id": "nm:same_question", "conversations": _conv(q, txt.paragraph(rng, 5), "")})
    # Images with their conversations: resized, re-encoded, cropped copies.
    root = out / gen.root
    for k, (label, change) in enumerate(
        (
            ("resized", lambda im, p: img.save(img.resized(im, 0.6), p)),
            ("jpeg_q35", lambda im, p: img.save(im, p, quality=35)),
            ("cropped", lambda im, p: img.save(img.cropped(im, 0.01), p)),
        )
    ):
        base = img.scene(rng, 800, 600)
        img.save(base, root / f"scene_{k}.jpg", quality=92)
        change(base, root / f"scene_{k}_{label}.jpg")
        q, a = txt.general_qa(rng)
        gen.add({"id": f"nd:base_{label}", "image": f"scene_{k}.jpg", "conversations": _conv(q, a)})
        copy_text = _conv(q, a.replace(". ", ".  ").replace(",", ""))
        gen.add(
            {"id": f"nd:{label}", "image": f"scene_{k}_{label}.jpg", "conversations": copy_text}
        )
    # Near-misses: the same image asked about differently (normal SFT data), and the same
    # conversation about a different image.
    gen.add(
        {
            "id": "nm:same_image",
            "image": "scene_0.jpg",
            "conversations": _conv("What colours dominate this picture?", txt.paragraph(rng, 3)),
        }
    )
    img.save(img.scene(rng, 800, 600), root / "scene_other.jpg", quality=92)
    first = orjson.loads(next(line for line in gen.lines if b'"nd:base_resized"' in line))
    gen.add(
        {"id": "nm:same_text", "image": "scene_other.jpg", "conversations": first["conversations"]}
    )
    _plant_leaks(out, rng, by_name)


def _plant_leaks(out: Path, rng: random.Random, by_name: dict[str, DemoDataset]) -> None:
    gen, sci = by_name["general_vqa"], by_name["science_text"]
    items = _make_benchmark(out, rng)
    root = out / gen.root
    # By image: item 1's image resized and re-encoded, asked about differently.
    (root / "leak_image.jpg").parent.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    im = Image.open(io.BytesIO(items[1][0])).convert("RGB")
    img.save(img.resized(im, 0.8), root / "leak_image.jpg", quality=80)
    q, a = txt.general_qa(rng)
    gen.add({"id": "leak:image", "image": "leak_image.jpg", "conversations": _conv(q, a)})
    # By text: item 3's question inside a text-only user turn.
    question = "Answer briefly. " + items[3][1]
    sci.add({"id": "leak:text", "conversations": _conv(question, txt.sentence(rng), prefix="")})
    # By both: item 5's image file and question.
    (root / "leak_both.jpg").write_bytes(items[5][0])
    gen.add(
        {
            "id": "leak:both",
            "image": "leak_both.jpg",
            "conversations": _conv(items[5][1], txt.sentence(rng)),
        }
    )
    # Near-miss: ten words of item 0's question (the check wants 13).
    ten = " ".join(items[0][1].split()[:10])
    sci.add(
        {"id": "nm:ten_words", "conversations": _conv(ten + " Discuss.", txt.sentence(rng), "")}
    )


def make_demo(out_dir: str | Path, *, seed: int = 0, scale: int = 1) -> Path:
    """Write the demo mixture to ``out_dir``; returns the meta JSON path."""
    out = Path(out_dir)
    rng = random.Random(seed)
    datasets = [
        _general(out, rng, 40 * scale),
        _charts(out, rng, 24 * scale),
        _documents(out, rng, 16 * scale),
        _multi_image(out, rng, 16 * scale),
        _video(out, rng, 6 * scale),
        _text("math_text", "mathematics", txt.math_qa, rng, 40 * scale, repeat_time=0.5),
        _text("code_text", "programming", txt.code_qa, rng, 30 * scale),
        _text("science_text", "disciplinary", txt.science_qa, rng, 20 * scale),
    ]
    by_name = {d.name: d for d in datasets}
    _plant_bad_samples(out, rng, by_name)
    _plant_near_duplicates(out, random.Random(seed + PLANTED_SEED), by_name)
    meta = {}
    for ds in datasets:
        ann = out / "annotations" / f"{ds.name}.jsonl"
        ann.parent.mkdir(parents=True, exist_ok=True)
        ann.write_bytes(b"\n".join(ds.lines) + b"\n")
        (out / ds.root).mkdir(parents=True, exist_ok=True)
        meta[ds.name] = {
            "root": ds.root,
            "annotation": f"annotations/{ds.name}.jsonl",
            "data_augment": ds.data_augment,
            "max_dynamic_patch": ds.max_dynamic_patch,
            "repeat_time": ds.repeat_time,
            "length": len(ds.lines),
            "domain": ds.domain,
        }
    meta_path = out / "meta.json"
    meta_path.write_bytes(orjson.dumps(meta, option=orjson.OPT_INDENT_2))
    return meta_path


def make_demo_models(out_dir: str | Path, *, judge: bool = True) -> dict[str, Path]:
    """Build the tiny tokenizer (and the tiny judge LLM) under ``out_dir/models``."""
    from curate.demo.models import build_judge_llm, build_tokenizer

    models = Path(out_dir) / "models"
    paths = {"tokenizer": models / "tokenizer"}
    if not (paths["tokenizer"] / "tokenizer.json").exists():
        build_tokenizer(paths["tokenizer"])
    if judge:
        paths["judge"] = models / "judge"
        if not (paths["judge"] / "config.json").exists():
            build_judge_llm(paths["judge"], paths["tokenizer"])
    return paths
