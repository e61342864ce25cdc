"""Prompt files, rendering, and the rendered prompts checked against golden files.

Regenerate the golden files after a deliberate prompt change with
``CURATE_UPDATE_GOLDEN=1 pytest tests/stages/score/test_prompts.py`` and review the diff.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from curate.stages.score.prompts import (
    PromptError,
    PromptLibrary,
    apply_chat_template,
    cut_middle,
    parse_prompt,
    render_conversation,
    render_user_message,
)

GOLDEN = Path(__file__).parent / "golden"
DOMAINS = (
    "general",
    "mathematics",
    "programming",
    "disciplinary",
    "ocr",
    "chart",
    "grounding",
    "multilingual",
)


def _sample(dataset, domain, kind, turns, images=()):
    return {
        "sample_id": "0123456789abcdef",
        "dataset": dataset,
        "line": 1,
        "domain": domain,
        "kind": kind,
        "conversations": [{"role": r, "text": t} for r, t in turns],
        "images": [
            {"path": f"/data/{dataset}/{i}.jpg", "width": w, "height": h}
            for i, (w, h) in enumerate(images)
        ],
    }


# One representative sample per prompt; the golden file is the full rendered prompt.
CASES = {
    "general": _sample(
        "general_vqa",
        "general",
        "image",
        [("human", "<image>\nWhat is on the table?"), ("gpt", "A red teapot and two cups.")],
        [(1024, 768)],
    ),
    "mathematics": _sample(
        "math_text", "mathematics", "text", [("human", "What is 12 * 7?"), ("gpt", "12 * 7 = 84.")]
    ),
    "programming": _sample(
        "code_text",
        "programming",
        "text",
        [("human", "Reverse a list in Python."), ("gpt", "Use slicing:\n```python\nxs[::-1]\n```")],
    ),
    "disciplinary": _sample(
        "science_text",
        "disciplinary",
        "text",
        [
            ("system", "You are a physics tutor."),
            ("human", "Why is the sky blue?"),
            ("gpt", "Rayleigh scattering favours short wavelengths."),
        ],
    ),
    "ocr": _sample(
        "doc_ocr",
        "ocr",
        "image",
        [
            ("human", "<image>\nTranscribe the document."),
            ("gpt", "INVOICE 2024-118\nTotal: 42.00 EUR"),
        ],
        [(600, 900)],
    ),
    "chart": _sample(
        "chart_qa",
        "chart",
        "image",
        [("human", "<image>\nWhich bar is highest?"), ("gpt", "B, at 81.")],
        [(640, 480)],
    ),
    "grounding": _sample(
        "refcoco",
        "grounding",
        "multi_image",
        [
            ("human", "Image-1: <image>\nImage-2: <image>\nWhere is the dog?"),
            ("gpt", "In Image-2 at [120, 40, 380, 300]."),
        ],
        [(448, 448), (800, 600)],
    ),
    "multilingual": _sample(
        "multi_zh",
        "multilingual",
        "video",
        [("human", "<video>\n视频里发生了什么？"), ("gpt", "一个人在厨房里做饭。")],
        [(320, 240)] * 8,
    ),
    "repetition": _sample(
        "general_vqa",
        "general",
        "image",
        [("human", "<image>\nDescribe the image."), ("gpt", "The cat sits. " * 6 + "The cat")],
        [(1024, 768)],
    ),
}


def test_every_domain_has_a_prompt_with_both_slots():
    lib = PromptLibrary()
    assert set(DOMAINS) | {"repetition"} <= set(lib.names())
    for name in lib.names():
        p = lib.get(name)
        assert "{metadata}" in p.text and "{conversation}" in p.text
        assert "0 to 10" in p.text, name
        assert p.description, name
        # The shared prefix (rubric) is most of the prompt: it comes before the sample.
        assert len(p.rubric) > 0.8 * len(p.text), name


@pytest.mark.parametrize("name", sorted(CASES))
def test_rendered_prompt_matches_golden(name, tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    lib = PromptLibrary()
    text = apply_chat_template(tok, render_user_message(lib.get(name), CASES[name]))
    path = GOLDEN / f"{name}.txt"
    if os.environ.get("CURATE_UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert text == path.read_text(encoding="utf-8")
    # The rubric is the prompt's shared prefix, right after the chat template's header.
    assert text.index(lib.get(name).rubric) == len("<|im_start|>user\n")


def test_conversation_rendering_for_text_and_vision_judges():
    s = CASES["grounding"]
    text = render_conversation(s["conversations"], s["images"], kind=s["kind"])
    assert text.splitlines()[0] == "User: Image-1: [image 1: 448x448]"
    assert "Image-2: [image 2: 800x600]" in text
    assert text.splitlines()[-1] == "Assistant: In Image-2 at [120, 40, 380, 300]."
    vlm = render_conversation(
        s["conversations"], s["images"], kind=s["kind"], image_placeholder="<image>"
    )
    assert vlm.count("<image>") == 2
    v = CASES["multilingual"]
    assert "[video: 8 frames]" in render_conversation(v["conversations"], v["images"], kind="video")
    frames = render_conversation(
        v["conversations"], v["images"], kind="video", image_placeholder="<IMG>"
    )
    assert frames.count("<IMG>") == 8 and "Frame-8: <IMG>" in frames


def test_long_turns_are_cut_in_the_middle_with_a_marker():
    text = "a" * 50 + "b" * 50
    cut = cut_middle(text, 40)
    assert cut.startswith("a" * 20) and cut.endswith("b" * 20)
    assert "[... 60 characters omitted ...]" in cut
    assert cut_middle("short", 40) == "short"


def test_slots_in_sample_text_are_not_substituted_again():
    p = parse_prompt("t", "Rubric.\n{metadata}\n{conversation}\nEnd.")
    s = _sample("d", "general", "text", [("human", "say {metadata}"), ("gpt", "{conversation}")])
    out = render_user_message(p, s)
    assert "User: say {metadata}" in out and "Assistant: {conversation}" in out


def test_prompt_resolution_mapping_alias_default(tmp_path):
    lib = PromptLibrary()
    assert lib.resolve("ds", "mathematics", {}, "general") == "mathematics"
    assert lib.resolve("ds", "science", {}, "general") == "disciplinary"  # alias
    assert lib.resolve("ds", "unheard-of", {}, "general") == "general"
    assert lib.resolve("ds", None, {}, "general") == "general"
    assert lib.resolve("ds", "mathematics", {"mathematics": "chart"}, "general") == "chart"
    assert lib.resolve("ds", "mathematics", {"ds": "ocr", "mathematics": "chart"}, "x") == "ocr"


def test_user_prompts_dir_adds_and_overrides(tmp_path):
    (tmp_path / "medical.md").write_text(
        "---\ndescription: medicine\n---\nRate 0 to 10.\n{metadata}\n{conversation}\n"
    )
    (tmp_path / "general.md").write_text("Mine.\n{conversation}\n")
    lib = PromptLibrary(tmp_path)
    assert lib.get("medical").description == "medicine"
    assert lib.get("general").text == "Mine.\n{conversation}"
    assert lib.resolve("ds", "medical", {}, "general") == "medical"
    assert "mathematics" in lib.names()


def test_prompt_errors_name_the_problem(tmp_path):
    with pytest.raises(PromptError, match="no prompt named 'nope'"):
        PromptLibrary().get("nope")
    with pytest.raises(PromptError, match="no {conversation} slot"):
        parse_prompt("bad", "just a rubric")
    with pytest.raises(PromptError, match="never closed"):
        parse_prompt("bad", "---\ndescription: x\n{conversation}")
    with pytest.raises(PromptError, match="prompts dir not found"):
        PromptLibrary(tmp_path / "missing")
