"""internvl2_5 template and loss masking, golden on a multi-turn, multi-image conversation."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from curate.core.chat import (
    IGNORE_INDEX,
    BatchTokenizer,
    ChatSample,
    expand_video,
    segments,
    tokenize,
)
from curate.stages.budget.stage import load_tokenizer

TURNS = [
    {"role": "human", "text": "Image-1: <image>\nImage-2: <image>\nWhat differs?"},
    {"role": "gpt", "text": "The first is red."},
    {"role": "human", "text": "And the second?"},
    {"role": "gpt", "text": "It is blue."},
]

GOLDEN_TEXT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nImage-1: <img><IMG_CONTEXT><IMG_CONTEXT></img>\n"
    "Image-2: <img><IMG_CONTEXT></img>\nWhat differs?<|im_end|>\n"
    "<|im_start|>assistant\nThe first is red.<|im_end|>\n"
    "<|im_start|>user\nAnd the second?<|im_end|>\n"
    "<|im_start|>assistant\nIt is blue.<|im_end|>\n"
)


def test_segments_golden():
    segs = segments(TURNS, [2, 1], system_prompt="You are a helpful assistant.")
    assert [r for r, _ in segs] == ["system", "human", "gpt", "human", "gpt"]
    assert "".join(t for _, t in segs) == GOLDEN_TEXT


def test_labels_cover_answers_and_im_end_only(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    ids, labels = tokenize(
        tok, segments(TURNS, [2, 1], system_prompt="You are a helpful assistant.")
    )
    assert tok.decode(ids) == GOLDEN_TEXT
    assert len(ids) == len(labels)
    trained = [t for t in labels if t != IGNORE_INDEX]
    assert tok.decode(trained) == "The first is red.<|im_end|>It is blue.<|im_end|>"
    # The "\n" after each <|im_end|> and the role prefixes are not trained.
    spans, current = [], []
    for t in labels:
        if t == IGNORE_INDEX:
            if current:
                spans.append(tok.decode(current))
            current = []
        else:
            current.append(t)
    assert spans == ["The first is red.<|im_end|>", "It is blue.<|im_end|>"]


def test_sample_system_turn_replaces_default():
    segs = segments([{"role": "system", "text": "Be brief."}, *TURNS], [1, 1])
    assert segs[0] == ("system", "<|im_start|>system\nBe brief.<|im_end|>\n")
    assert segments(TURNS[:2], [1, 1], system_prompt=None)[0][0] == "human"


def test_video_expansion_as_internvl():
    assert expand_video("<video>\nWhat happens?", 3) == (
        "Frame-1: <image>\nFrame-2: <image>\nFrame-3: <image>\nWhat happens?"
    )


# -- BatchTokenizer: the same ids and labels as tokenize, for any conversation ---------------


# Text that tries the split: added tokens typed in the text, whitespace on both sides of them,
# placeholders, newlines, non-ASCII.
_ATOMS = st.sampled_from(
    [
        " ",
        "  ",
        "\n",
        "\n\n",
        "\t",
        "a",
        "word",
        " x",
        "12",
        "日本",
        "ü",
        "<image>",
        "<video>",
        "<img>",
        "</img>",
        "<|im_end|>",
        "<|im_start|>",
        "<IMG_CONTEXT>",
        "<image",
        "\r\n",
    ]
)
_TEXT = st.lists(_ATOMS, max_size=12).map("".join)


@st.composite
def chat_samples(draw):
    n_turns = draw(st.integers(1, 4))
    turns = []
    if draw(st.booleans()):
        turns.append({"role": "system", "text": draw(_TEXT)})
    for _ in range(n_turns):
        turns.append({"role": "human", "text": draw(_TEXT)})
        turns.append({"role": "gpt", "text": draw(_TEXT)})
    video = draw(st.integers(0, 3)) if any("<video>" in t["text"] for t in turns) else 0
    text = "".join(t["text"] for t in turns if t["role"] == "human")
    placeholders = (
        text.count("<image>") + (video - 1) * text.count("<video>")
        if video
        else text.count("<image>")
    )
    n_images = draw(st.integers(0, max(0, placeholders)))
    if video:
        n_images = placeholders  # every frame placeholder is an image
    counts = draw(st.lists(st.integers(0, 600), min_size=n_images, max_size=n_images))
    system = draw(st.sampled_from([None, "You are a helpful assistant.", " sys\n<img> "]))
    return ChatSample(turns, counts, system_prompt=system, n_video_frames=video)


@pytest.fixture(scope="module")
def batch_tokenizer(tokenizer_dir):
    return BatchTokenizer(load_tokenizer(tokenizer_dir))


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(chat_samples(), min_size=1, max_size=6))
def test_batch_tokenizer_equals_tokenize(batch_tokenizer, samples):
    assert batch_tokenizer.exact
    valid = []
    for s in samples:
        try:
            s.segments()
        except ValueError:  # fewer placeholders than images: tokenize refuses it too
            continue
        valid.append(s)
    got = batch_tokenizer(valid, chunk_samples=2)
    want = [tokenize(batch_tokenizer.tokenizer, s.segments()) for s in valid]
    assert got == want


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(chat_samples(), min_size=1, max_size=6))
def test_compact_ids_expand_to_tokenize(batch_tokenizer, samples):
    """The compact form (image context runs left out, their places recorded) puts back to
    exactly tokenize's ids and labels, whatever the text holds (typed <img>, <IMG_CONTEXT>)."""
    from curate.stages.pack.store import expand

    valid = []
    for s in samples:
        try:
            s.segments()
        except ValueError:
            continue
        valid.append(s)
    context = batch_tokenizer.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    for s, c in zip(valid, batch_tokenizer.compact(valid), strict=True):
        ids, labels = expand(c.input_ids, c.labels, c.context_at, c.context_len, context)
        want_ids, want_labels = tokenize(batch_tokenizer.tokenizer, s.segments())
        assert (ids.tolist(), labels.tolist()) == (want_ids, want_labels)
        assert len(c.input_ids) == len(want_ids) - sum(c.context_len)


def test_batch_tokenizer_golden(batch_tokenizer):
    sample = ChatSample(TURNS, [2, 1], system_prompt="You are a helpful assistant.")
    ((ids, labels),) = batch_tokenizer([sample])
    assert (ids, labels) == tokenize(batch_tokenizer.tokenizer, sample.segments())
    assert ids.count(batch_tokenizer.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")) == 3


def test_a_tokenizer_that_adds_bos_keeps_it_per_segment(tokenizer_dir):
    """InternVL tokenises each segment with the tokenizer's special tokens (a BOS per segment
    for tokenizers that add one): the batch tokenizer does the same."""
    from tokenizers import processors

    tok = load_tokenizer(tokenizer_dir)
    bos = tok.convert_tokens_to_ids("<|im_start|>")
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", bos)]
    )
    assert tok("a").input_ids[0] == bos
    bt = BatchTokenizer(tok)
    sample = ChatSample(TURNS, [2, 1])
    assert bt.exact and bt([sample]) == [tokenize(tok, sample.segments())]


def test_a_tokenizer_it_cannot_match_falls_back_to_tokenize(tokenizer_dir, monkeypatch):
    tok = load_tokenizer(tokenizer_dir)
    monkeypatch.setattr(BatchTokenizer, "_agrees_with_tokenize", lambda self: False)
    bt = BatchTokenizer(tok)
    sample = ChatSample(TURNS, [2, 1])
    assert not bt.exact and bt([sample]) == [tokenize(tok, sample.segments())]
