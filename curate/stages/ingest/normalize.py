"""One annotation line -> one normalised sample row, or the list of reasons it cannot be one.

Checks mirror what would break InternVL's dataloader (and then some): encoding, JSON, the
conversation's shape, placeholder counts, image paths and headers. Every problem found is
reported, not only the first, so the ledger explains the whole sample.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from curate.core.images import ImageProblem, list_frames, read_image_size, resolve_in_root
from curate.core.records import ROLES
from curate.stages.ingest.meta import DatasetSpec

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"
DEFAULT_MAX_LINE_BYTES = 16 * 1024 * 1024
# Annotation keys that become columns; everything else is kept in ``extra``.
CONSUMED_KEYS = {"image", "video", "conversations"}


@dataclass
class Problem:
    rule: str
    detail: str
    value: float | None = None
    threshold: float | None = None


@dataclass
class Parsed:
    row: dict | None = None
    problems: list[Problem] = field(default_factory=list)


def _decode(line: bytes, max_line_bytes: int) -> tuple[dict | None, Problem | None]:
    if len(line) > max_line_bytes:
        return None, Problem("line_too_long", f"{len(line)} bytes", len(line), max_line_bytes)
    if not line.strip():
        return None, Problem("blank_line", "the line is empty")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, Problem("invalid_utf8", f"byte {e.start}: {e.reason}")
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError as e:
        return None, Problem("malformed_json", str(e))
    if not isinstance(obj, dict):
        return None, Problem("not_an_object", f"the line is a JSON {type(obj).__name__}")
    return obj, None


def _conversations(obj: dict) -> tuple[list[dict], list[Problem]]:
    turns = obj.get("conversations")
    if not isinstance(turns, list) or not turns:
        return [], [
            Problem("missing_conversations", "'conversations' is missing, empty or not a list")
        ]
    out, problems = [], []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            problems.append(Problem("malformed_turn", f"turn {i} lacks a string 'value'"))
            continue
        role = turn.get("from")
        if role not in ROLES:
            problems.append(Problem("unknown_role", f"turn {i} has role {role!r}"))
            continue
        out.append({"role": role, "text": turn["value"]})
    if not problems:
        roles = {t["role"] for t in out}
        if "human" not in roles:
            problems.append(Problem("no_user_turn", "no 'human' turn"))
        if "gpt" not in roles:
            problems.append(Problem("no_assistant_turn", "no 'gpt' turn"))
    return out, problems


def _image_list(obj: dict) -> tuple[list[str], Problem | None]:
    value = obj.get("image")
    if value is None or value == "" or value == []:
        return [], None  # InternVL reads an empty image field as a text-only sample
    if isinstance(value, str):
        return [value], None
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value, None
    return [], Problem(
        "malformed_image_field", f"'image' must be a path or list of paths: {value!r:.80}"
    )


def _prepend_placeholder(turns: list[dict], token: str) -> None:
    # InternVL inserts the placeholder before the first human turn when a single-image or
    # video sample has none; we do the same so token counts match its dataloader.
    first = next(t for t in turns if t["role"] == "human")
    first["text"] = f"{token}\n{first['text']}"


def _check_placeholders(turns: list[dict], n_images: int, is_video: bool) -> list[Problem]:
    human = [t for t in turns if t["role"] == "human"]
    n_image_tokens = sum(t["text"].count(IMAGE_TOKEN) for t in human)
    n_video_tokens = sum(t["text"].count(VIDEO_TOKEN) for t in human)
    if is_video:
        if n_video_tokens == 0 and n_image_tokens == 0:
            _prepend_placeholder(turns, VIDEO_TOKEN)
        elif n_video_tokens != 1 or n_image_tokens:
            return [
                Problem(
                    "video_placeholder_mismatch",
                    f"{n_video_tokens} <video> and {n_image_tokens} <image> placeholders; "
                    "a video sample needs exactly one <video>",
                    n_video_tokens,
                    1,
                )
            ]
        return []
    if n_images == 1 and n_image_tokens == 0:
        _prepend_placeholder(turns, IMAGE_TOKEN)
        return []
    if n_image_tokens != n_images or n_video_tokens:
        return [
            Problem(
                "image_count_mismatch",
                f"{n_image_tokens} <image> placeholders in user turns for {n_images} images",
                n_image_tokens,
                n_images,
            )
        ]
    return []


def symlink_loop(root: str, relpath: str) -> str | None:
    """The symlink loop that ``relpath`` under ``root`` runs into, as ``a -> b -> a`` relative
    to the root; None when there is none."""
    path = os.path.join(root, relpath)
    if not _loops(path):
        return None
    parts = Path(path).parts
    for i in range(1, len(parts) + 1):  # the first link on the way that loops
        link = os.path.join(*parts[:i])
        if os.path.islink(link) and _loops(link):
            chain = [link]
            while len(chain) <= 40 and os.path.islink(chain[-1]):
                target = os.path.join(os.path.dirname(chain[-1]), os.readlink(chain[-1]))
                chain.append(os.path.normpath(target))
                if chain[-1] in chain[:-1]:
                    break
            return " -> ".join(os.path.relpath(p, root) for p in chain)
    return None


def _loops(path: str) -> bool:
    """Whether following ``path`` ends in ELOOP (a loop, or too many links in a row)."""
    try:
        os.stat(path)
    except OSError as e:
        return e.errno == errno.ELOOP
    return False


def _problem(spec: DatasetSpec, rel: str, p: ImageProblem) -> Problem:
    """The ledger problem of an image or video path; a missing file that is really a symlink
    loop says so."""
    if p.rule in ("image_missing", "video_unreadable"):
        loop = symlink_loop(spec.root, rel)
        if loop is not None:
            return Problem("symlink_loop", f"{rel!r} runs into a symlink loop: {loop}")
    return Problem(p.rule, p.detail, p.value, p.threshold)


def _resolve_images(
    spec: DatasetSpec, paths: list[str], max_pixels: int
) -> tuple[list[dict], list[Problem]]:
    images, problems = [], []
    for rel in paths:
        try:
            real = resolve_in_root(spec.root, rel)
            w, h = read_image_size(real, max_pixels=max_pixels)
            images.append({"path": real, "width": w, "height": h})
        except ImageProblem as p:
            problems.append(_problem(spec, rel, p))
    return images, problems


def _resolve_video(
    spec: DatasetSpec, rel: str, max_pixels: int
) -> tuple[list[dict], list[Problem]]:
    try:
        folder = resolve_in_root(spec.root, rel)
        frames = list_frames(folder)
    except ImageProblem as p:
        return [], [_problem(spec, rel, p)]
    return _resolve_images(spec, frames, max_pixels)


def parse_line(
    line: bytes,
    spec: DatasetSpec,
    *,
    max_image_pixels: int,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
) -> Parsed:
    """Parse and check one annotation line of dataset ``spec``."""
    obj, problem = _decode(line, max_line_bytes)
    if problem:
        return Parsed(problems=[problem])
    turns, problems = _conversations(obj)
    paths, bad_field = _image_list(obj)
    problems += [bad_field] if bad_field else []
    video = obj.get("video")
    if video == "":
        video = None  # text-only, as in InternVL
    if video is not None and not isinstance(video, str):
        problems.append(Problem("malformed_video_field", f"'video' must be a path: {video!r:.80}"))
    if paths and video:
        problems.append(Problem("image_and_video", "a sample has either images or a video"))
    if problems:
        return Parsed(problems=problems)
    problems += _check_placeholders(turns, len(paths), is_video=bool(video))
    if video:
        images, img_problems = _resolve_video(spec, video, max_image_pixels)
    else:
        images, img_problems = _resolve_images(spec, paths, max_image_pixels)
    problems += img_problems
    if problems:
        return Parsed(problems=problems)
    kind = "video" if video else {0: "text", 1: "image"}.get(len(images), "multi_image")
    extra = {k: v for k, v in obj.items() if k not in CONSUMED_KEYS}
    row = {
        "domain": spec.domain,
        "kind": kind,
        "conversations": turns,
        "images": images,
        "video": video,
        "extra": orjson.dumps(extra).decode() if extra else None,
    }
    return Parsed(row=row)
