"""InternVL's ``internvl2_5`` chat template and loss masking (``preprocess_internvl2_5``).

A conversation becomes segments ``<|im_start|>{role}\\n{text}<|im_end|>\\n`` (system first),
each tokenised on its own as InternVL does. Labels: only assistant segments are trained, minus
their ``<|im_start|>assistant\\n`` prefix and their final ``\\n`` token, so the loss covers the
answer and its ``<|im_end|>``. Each ``<image>`` in a user turn becomes ``<img>`` +
``<IMG_CONTEXT>`` x (256·tiles of that image) + ``</img>``.
"""

from __future__ import annotations

from collections.abc import Sequence

IMG_START = "<img>"
IMG_END = "</img>"
IMG_CONTEXT = "<IMG_CONTEXT>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [IM_START, IM_END, IMG_START, IMG_END, IMG_CONTEXT]
IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"

# The system message of InternVL's internvl2_5 template (used when a sample has none).
INTERNVL_SYSTEM_PROMPT = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的"
    "多模态大语言模型。"
)
ROLE_NAMES = {"system": "system", "human": "user", "gpt": "assistant"}

# A Jinja chat template equivalent to the segments below, saved with the tokenizer so that
# ``tokenizer.apply_chat_template`` (vLLM, transformers) renders the same text.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def expand_video(text: str, n_frames: int) -> str:
    """Replace ``<video>`` by ``Frame-1: <image>\\nFrame-2: <image>...`` as InternVL does."""
    frames = "\n".join(f"Frame-{i + 1}: {IMAGE_PLACEHOLDER}" for i in range(n_frames))
    return text.replace(VIDEO_PLACEHOLDER + "\n", frames + "\n").replace(VIDEO_PLACEHOLDER, frames)


def image_tokens(n_context: int) -> str:
    return IMG_START + IMG_CONTEXT * n_context + IMG_END


def segments(
    turns: Sequence[dict],
    image_token_counts: Sequence[int],
    *,
    system_prompt: str | None = INTERNVL_SYSTEM_PROMPT,
    n_video_frames: int = 0,
) -> list[tuple[str, str]]:
    """(role, segment text) pairs of one sample; ``<image>`` expanded per image in order.

    ``image_token_counts[k]`` is the number of ``<IMG_CONTEXT>`` tokens of the k-th image
    (256·tiles). Pass ``n_video_frames`` for a video sample (each frame is one image).
    """
    turns = [dict(t) for t in turns]
    if turns and turns[0]["role"] == "system":
        system_prompt = turns.pop(0)["text"]
    out: list[tuple[str, str]] = []
    if system_prompt is not None:
        out.append(("system", f"{IM_START}system\n{system_prompt}{IM_END}\n"))
    k = 0
    for turn in turns:
        text = turn["text"]
        if turn["role"] == "human":
            if n_video_frames:
                text = expand_video(text, n_video_frames)
            while IMAGE_PLACEHOLDER in text and k < len(image_token_counts):
                text = text.replace(IMAGE_PLACEHOLDER, image_tokens(image_token_counts[k]), 1)
                k += 1
        role = ROLE_NAMES[turn["role"]]
        out.append((turn["role"], f"{IM_START}{role}\n{text}{IM_END}\n"))
    if k != len(image_token_counts):
        raise ValueError(f"{k} <image> placeholders for {len(image_token_counts)} images")
    return out


def tokenize(tokenizer, segs: list[tuple[str, str]]) -> tuple[list[int], list[int]]:
    """input_ids and labels of one sample, segment by segment, as InternVL does."""
    ids_per_segment = tokenizer([text for _, text in segs]).input_ids
    prefix_len = len(tokenizer(f"{IM_START}assistant\n").input_ids)
    input_ids: list[int] = []
    labels: list[int] = []
    for (role, _), ids in zip(segs, ids_per_segment, strict=True):
        input_ids.extend(ids)
        if role == "gpt":
            # Train on the answer and <|im_end|>; not on the role prefix or the final "\n".
            n = len(ids)
            labels.extend([IGNORE_INDEX] * prefix_len + ids[prefix_len : n - 1] + [IGNORE_INDEX])
        else:
            labels.extend([IGNORE_INDEX] * len(ids))
    return input_ids, labels
