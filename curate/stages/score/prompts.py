"""Scoring prompts: one Markdown file per domain under ``prompts/``, loaded by name.

A prompt file is Markdown with an optional front matter block (``description: ...``) and two
slots, ``{metadata}`` and ``{conversation}``, replaced verbatim (no other brace is special, so
rubrics may show code). Everything before the first slot is the rubric; it comes first so that
every request of a prompt shares that prefix in the engine's prefix cache. The user message is
then rendered through the judge's own chat template.

The sample is shown as InternVL's scoring did: ``User:`` / ``Assistant:`` turns, with each
``<image>`` replaced by ``[image k: WxH]`` (a text judge cannot see pixels) and ``<video>`` by
``[video: N frames]``; for a vision-language judge the placeholders stay images instead.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from curate.core.chat import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, expand_video
from curate.core.errors import CurateError

SLOTS = ("{metadata}", "{conversation}")
SPEAKERS = {"system": "System", "human": "User", "gpt": "Assistant"}

# Domain spellings other tools use -> our prompt names.
DOMAIN_ALIASES = {
    "science": "disciplinary",
    "math": "mathematics",
    "code": "programming",
    "coding": "programming",
    "document": "ocr",
    "table": "chart",
    "caption": "general",
}


class PromptError(CurateError):
    """A prompt that cannot be found or is malformed."""


def builtin_prompts_dir() -> Path:
    """The repository's ``prompts/`` folder (beside the ``curate`` package)."""
    return Path(__file__).resolve().parents[3] / "prompts"


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    text: str  # body, front matter removed
    description: str = ""
    path: Path | None = None

    @property
    def rubric(self) -> str:
        """The shared prefix: the body up to its first slot."""
        return self.text[: min(self.text.index(s) for s in SLOTS if s in self.text)]

    def fill(self, metadata: str, conversation: str) -> str:
        # One pass, so a sample that contains "{metadata}" is never substituted twice.
        values = {"{metadata}": metadata, "{conversation}": conversation}
        return re.sub(r"\{metadata\}|\{conversation\}", lambda m: values[m.group(0)], self.text)


def parse_prompt(name: str, source: str, path: Path | None = None) -> PromptTemplate:
    meta: dict = {}
    body = source
    if source.startswith("---\n"):
        end = source.find("\n---\n", 4)
        if end < 0:
            raise PromptError(f"prompt {name}: front matter opened with --- is never closed")
        meta = yaml.safe_load(source[4:end]) or {}
        if not isinstance(meta, dict):
            raise PromptError(f"prompt {name}: front matter must be a mapping")
        body = source[end + 5 :]
    if "{conversation}" not in body:
        raise PromptError(f"prompt {name} ({path or 'text'}) has no {{conversation}} slot")
    return PromptTemplate(name, body.strip(), str(meta.get("description", "")), path)


class PromptLibrary:
    """Prompts by name: files in ``extra_dir`` first, then the built-in ``prompts/``."""

    def __init__(self, extra_dir: str | Path | None = None, builtin_dir: Path | None = None):
        self.dirs = [Path(d) for d in (extra_dir, builtin_dir or builtin_prompts_dir()) if d]
        if extra_dir is not None and not Path(extra_dir).is_dir():
            raise PromptError(f"prompts dir not found: {extra_dir}")
        self._cache: dict[str, PromptTemplate] = {}

    def names(self) -> list[str]:
        found = {
            p.stem
            for d in self.dirs
            if d.is_dir()
            for p in d.glob("*.md")
            if not p.name.startswith(("_", ".")) and p.stem != "README"
        }
        return sorted(found)

    def has(self, name: str) -> bool:
        return any((d / f"{name}.md").is_file() for d in self.dirs)

    def get(self, name: str) -> PromptTemplate:
        if name not in self._cache:
            for d in self.dirs:
                path = d / f"{name}.md"
                if path.is_file():
                    self._cache[name] = parse_prompt(name, path.read_text("utf-8"), path)
                    break
            else:
                where = ", ".join(str(d) for d in self.dirs)
                raise PromptError(
                    f"no prompt named {name!r} (looked for {name}.md in {where}); "
                    f"available: {', '.join(self.names())}"
                )
        return self._cache[name]

    def resolve(
        self, dataset: str, domain: str | None, mapping: dict[str, str], default: str
    ) -> str:
        """The prompt name for a sample: mapping by dataset, by domain, the domain's own
        prompt (or its alias), else ``default``."""
        domain = (domain or "").strip()
        for key in (dataset, domain):
            if key and key in mapping:
                return mapping[key]
        if domain and self.has(domain):
            return domain
        alias = DOMAIN_ALIASES.get(domain.lower())
        if alias and self.has(alias):
            return alias
        return default


def cut_middle(text: str, max_chars: int) -> str:
    """Keep the head and tail of an overlong turn, saying how much was left out."""
    if len(text) <= max_chars:
        return text
    keep = max_chars // 2
    omitted = len(text) - 2 * keep
    return f"{text[:keep]}\n[... {omitted} characters omitted ...]\n{text[-keep:]}"


def render_conversation(
    turns: Sequence[dict],
    images: Sequence[dict],
    *,
    kind: str = "text",
    max_turn_chars: int = 4000,
    image_placeholder: str | None = None,
) -> str:
    """``User:`` / ``Assistant:`` lines of a sample.

    Text judge (``image_placeholder`` None): ``<image>`` -> ``[image k: WxH]``, ``<video>`` ->
    ``[video: N frames]``. Vision-language judge: every image (every video frame) becomes
    ``image_placeholder``, in the order the images are passed to the engine.
    """
    lines = []
    k = 0
    for turn in turns:
        text = turn["text"]
        if kind == "video" and VIDEO_PLACEHOLDER in text:
            if image_placeholder is None:
                text = text.replace(VIDEO_PLACEHOLDER, f"[video: {len(images)} frames]")
            else:
                text = expand_video(text, len(images))
        if IMAGE_PLACEHOLDER in text:
            parts = text.split(IMAGE_PLACEHOLDER)
            out = [parts[0]]
            for part in parts[1:]:
                if image_placeholder is not None:
                    out.append(image_placeholder)
                elif k < len(images):
                    im = images[k]
                    out.append(f"[image {k + 1}: {im['width']}x{im['height']}]")
                else:
                    out.append("[image: missing]")
                k += 1
                out.append(part)
            text = "".join(out)
        text = cut_middle(text.strip(), max_turn_chars)
        lines.append(f"{SPEAKERS.get(turn['role'], turn['role'])}: {text}")
    return "\n".join(lines)


def render_metadata(sample: dict) -> str:
    """One line about where the sample comes from."""
    n = len(sample.get("images") or [])
    kind = sample.get("kind") or "text"
    media = {"text": "no images", "video": f"video of {n} frames"}.get(
        kind, f"{n} image{'s' if n != 1 else ''}"
    )
    return f"Dataset: {sample['dataset']} | domain: {sample.get('domain') or 'unknown'} | {media}"


def render_user_message(
    template: PromptTemplate,
    sample: dict,
    *,
    max_turn_chars: int = 4000,
    image_placeholder: str | None = None,
) -> str:
    conversation = render_conversation(
        sample["conversations"],
        sample.get("images") or [],
        kind=sample.get("kind") or "text",
        max_turn_chars=max_turn_chars,
        image_placeholder=image_placeholder,
    )
    return template.fill(render_metadata(sample), conversation)


def apply_chat_template(tokenizer, user_message: str) -> str:
    """The full prompt text: the judge's chat template around one user message, ready for the
    assistant's reply. A tokenizer without a template gets a plain ``User/Assistant`` frame."""
    messages = [{"role": "user", "content": user_message}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"{user_message}\n\nScore:"
