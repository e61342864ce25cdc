"""InternVL's ``internvl2_5`` chat template and loss masking (``preprocess_internvl2_5``).

A conversation becomes segments ``<|im_start|>{role}\\n{text}<|im_end|>\\n`` (system first),
each tokenised on its own as InternVL does. Labels: only assistant segments are trained, minus
their ``<|im_start|>assistant\\n`` prefix and their final ``\\n`` token, so the loss covers the
answer and its ``<|im_end|>``. Each ``<image>`` in a user turn becomes ``<img>`` +
``<IMG_CONTEXT>`` x (256·tiles of that image) + ``</img>``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

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


def segment_parts(
    turns: Sequence[dict],
    n_images: int,
    *,
    system_prompt: str | None = INTERNVL_SYSTEM_PROMPT,
    n_video_frames: int = 0,
) -> list[tuple[str, list[str | None]]]:
    """(role, parts) of one sample's segments: text, and ``None`` where the next image's
    ``<img>...</img>`` goes (the k-th ``<image>`` of the user turns, for k < ``n_images``)."""
    turns = [dict(t) for t in turns]
    if turns and turns[0]["role"] == "system":
        system_prompt = turns.pop(0)["text"]
    out: list[tuple[str, list[str | None]]] = []
    if system_prompt is not None:
        out.append(("system", [f"{IM_START}system\n{system_prompt}{IM_END}\n"]))
    k = 0
    for turn in turns:
        text = turn["text"]
        role = ROLE_NAMES[turn["role"]]
        pieces = [text]
        if turn["role"] == "human":
            if n_video_frames:
                text = expand_video(text, n_video_frames)
            # InternVL replaces the first remaining <image> once per image, in order.
            pieces = text.split(IMAGE_PLACEHOLDER, n_images - k) if k < n_images else [text]
            k += len(pieces) - 1
        parts: list[str | None] = [f"{IM_START}{role}\n{pieces[0]}"]
        for piece in pieces[1:]:
            parts += [None, piece]
        parts[-1] = f"{parts[-1]}{IM_END}\n"
        out.append((turn["role"], parts))
    if k != n_images:
        raise ValueError(f"{k} <image> placeholders for {n_images} images")
    return out


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
    parts = segment_parts(
        turns,
        len(image_token_counts),
        system_prompt=system_prompt,
        n_video_frames=n_video_frames,
    )
    counts = iter(image_token_counts)
    return [
        (role, "".join(image_tokens(next(counts)) if p is None else p for p in ps))
        for role, ps in parts
    ]


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


@dataclass(frozen=True)
class ChatSample:
    """What ``BatchTokenizer`` tokenises: a sample's turns, its images' context token counts
    (256·tiles each, in order) and the template's settings (the arguments of ``segments``)."""

    turns: Sequence[dict]
    image_token_counts: Sequence[int]
    system_prompt: str | None = INTERNVL_SYSTEM_PROMPT
    n_video_frames: int = 0

    def parts(self) -> list[tuple[str, list[str | None]]]:
        return segment_parts(
            self.turns,
            len(self.image_token_counts),
            system_prompt=self.system_prompt,
            n_video_frames=self.n_video_frames,
        )

    def segments(self) -> list[tuple[str, str]]:
        return segments(
            self.turns,
            self.image_token_counts,
            system_prompt=self.system_prompt,
            n_video_frames=self.n_video_frames,
        )


class CompactIds(NamedTuple):
    """A sample's ids and labels without its image context runs (``BatchTokenizer.compact``)."""

    input_ids: list[int]
    labels: list[int]
    context_at: list[int]  # where each run goes back, as a position in input_ids
    context_len: list[int]  # its length


class BatchTokenizer:
    """``tokenize`` for many samples at once, with exactly the same ids and labels, faster.

    A tokenizer splits its input at added tokens (``<|im_start|>``, ``<img>``...) and encodes
    the text between them on its own, so a segment's ids are those of its text pieces with the
    added tokens' ids between. This class does that split itself, so that:

    - ``<IMG_CONTEXT>`` x 256·tiles never goes through the tokenizer as text: the image's ids
      are inserted (an image of 13 tiles is 3,328 added tokens, 43k characters of text);
    - every distinct text piece is encoded once per batch (the system prompt, ``"\\n"`` after
      each ``<|im_end|>``, ``"user\\n"``...), all pieces of a batch in one call of the tokenizer.

    At construction it checks itself against ``tokenize`` on conversations built to catch where
    splitting could differ (whitespace next to added tokens, added tokens typed inside the text,
    a tokenizer that adds BOS/EOS); if one differs, ``exact`` is False and every sample goes
    through ``tokenize``.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._added_ids = dict(tokenizer.get_added_vocab())
        names = sorted(self._added_ids, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None
        with_special = tokenizer("a").input_ids
        bare = tokenizer("a", add_special_tokens=False).input_ids
        at = _find(with_special, bare)
        self._head = with_special[:at] if at >= 0 else []
        self._tail = with_special[at + len(bare) :] if at >= 0 else []
        self.prefix_len = len(tokenizer(f"{IM_START}assistant\n").input_ids)
        ids = [self._added_ids.get(t) for t in (IMG_START, IMG_CONTEXT, IMG_END)]
        self._image_ids = ids
        self.exact = at >= 0 and None not in ids
        self.exact = self.exact and self._agrees_with_tokenize()

    def __call__(
        self, samples: Sequence[ChatSample], chunk_samples: int = 2048
    ) -> list[tuple[list[int], list[int]]]:
        """(input_ids, labels) of every sample, as ``tokenize(tokenizer, sample.segments())``;
        ``chunk_samples`` at a time, so the tokenizer's encodings stay small."""
        if not self.exact:
            return [tokenize(self.tokenizer, s.segments()) for s in samples]
        out = []
        for start in range(0, len(samples), chunk_samples):
            out += [r[:2] for r in self._chunk(samples[start : start + chunk_samples], False)]
        return out

    def compact(
        self, samples: Sequence[ChatSample], chunk_samples: int = 2048
    ) -> list[CompactIds] | None:
        """Each sample's ids and labels without its images' ``<IMG_CONTEXT>`` runs, and where
        those runs go (positions in the compact ids) and their lengths: the same sequence as
        ``__call__``'s, never built in full. Every image has its place recorded, even at 0
        tokens, so ids made with 0 context tokens per image (the budget's) serve any grid.
        None when this tokenizer is not ``exact``."""
        if not self.exact:
            return None
        out = []
        for start in range(0, len(samples), chunk_samples):
            out += [
                CompactIds(*r) for r in self._chunk(samples[start : start + chunk_samples], True)
            ]
        return out

    def _chunk(self, samples: Sequence[ChatSample], compact: bool) -> list[tuple]:
        split = [[(role, self._split_parts(ps)) for role, ps in s.parts()] for s in samples]
        pieces = list({p for sample in split for _, ps in sample for p in ps if isinstance(p, str)})
        encoded = dict(zip(pieces, self._encode(pieces), strict=True))
        return [
            self._assemble(segs, s.image_token_counts, encoded, compact)
            for s, segs in zip(samples, split, strict=True)
        ]

    def _split_parts(self, parts: list[str | None]) -> list[str | int | None]:
        """Text pieces (str), added-token ids (int) and image slots (None), in order."""
        out: list[str | int | None] = []
        for part in parts:
            if part is None:
                out.append(None)
                continue
            pieces = self._split.split(part) if self._split is not None else [part]
            for k, piece in enumerate(pieces):
                if k % 2:
                    out.append(self._added_ids[piece])
                elif piece:
                    out.append(piece)
        return out

    def _encode(self, pieces: list[str]) -> list[list[int]]:
        return self.tokenizer(pieces, add_special_tokens=False).input_ids if pieces else []

    def _assemble(self, segs, counts: Sequence[int], encoded, compact: bool = False) -> tuple:
        """(ids, labels, context_at, context_len); compact: the image context runs are left
        out and recorded (an image is only ever in a turn whose labels are ignored, so they
        would have been ignored labels)."""
        start, context, end = self._image_ids
        images = iter(counts)
        input_ids: list[int] = []
        labels: list[int] = []
        context_at: list[int] = []
        context_len: list[int] = []
        for role, parts in segs:
            ids = list(self._head)
            for p in parts:
                if p is None:
                    n = next(images)
                    if compact and role != "gpt":
                        ids.append(start)
                        context_at.append(len(input_ids) + len(ids))
                        context_len.append(n)
                        ids.append(end)
                    else:
                        ids += [start, *[context] * n, end]
                elif isinstance(p, str):
                    ids += encoded[p]
                else:
                    ids.append(p)
            ids += self._tail
            input_ids += ids
            if role == "gpt":  # the answer and <|im_end|>; not the role prefix nor the "\\n"
                n = len(ids)
                labels += [IGNORE_INDEX] * self.prefix_len + ids[self.prefix_len : n - 1]
                labels.append(IGNORE_INDEX)
            else:
                labels += [IGNORE_INDEX] * len(ids)
        return input_ids, labels, context_at, context_len

    def _agrees_with_tokenize(self) -> bool:
        checks = [
            ChatSample(
                [
                    {"role": "human", "text": f" {IMAGE_PLACEHOLDER}\n x {IMAGE_PLACEHOLDER}y\n\n"},
                    {"role": "gpt", "text": f"\n {IM_END} 12  ab\t\n{IMG_START}</img>"},
                    {"role": "human", "text": "日本語 ünïcode  <image>"},
                    {"role": "gpt", "text": " "},
                ],
                [512, 256],
            ),
            ChatSample(
                [{"role": "system", "text": f"  s {IMG_START}\n"}, {"role": "gpt", "text": "x"}],
                [],
            ),
            ChatSample(
                [{"role": "human", "text": "<video>\nWhat?"}, {"role": "gpt", "text": "A."}],
                [256] * 3,
                n_video_frames=3,
            ),
        ]
        fast = self(checks)
        return all(
            f == tokenize(self.tokenizer, s.segments()) for f, s in zip(fast, checks, strict=True)
        )


def _find(seq: list[int], sub: list[int]) -> int:
    for i in range(len(seq) - len(sub) + 1):
        if seq[i : i + len(sub)] == sub:
            return i
    return -1
