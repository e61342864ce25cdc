"""internvl2_5 template and loss masking, golden on a multi-turn, multi-image conversation."""

from __future__ import annotations

from curate.core.chat import IGNORE_INDEX, expand_video, segments, tokenize
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
