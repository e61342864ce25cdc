"""The InternVL 2.5 model, as transformers builds it (``InternVLForConditionalGeneration``).

Vision tower (InternViT, CLS token dropped) → pixel unshuffle with ``downsample_ratio`` 0.5
(2×2 patches → one token of 4·C channels) → projector ``LayerNorm(4C) → Linear(4C, D) → GELU
→ Linear(D, D)`` → language model (Qwen2). A 448² tile of 14² patches gives
``(448/14)² · 0.5² = 256`` tokens, scattered in order into the ``<IMG_CONTEXT>`` positions
(``config.image_token_id``) of the input ids.

Sizes are flavors in an explicit dict: ``debug`` (tiny, random, CPU in seconds; tiles stay
448² and 256 tokens so manifests and tiling are the real ones) and ``1b``
(InternViT-300M-448px-V2_5 + Qwen2.5-0.5B-Instruct shapes). A model comes from a flavor
(random init), a local HF InternVL directory, or a vision checkpoint plus an LLM checkpoint
with a fresh projector (progressive scaling). No remote code, no hub access.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from curate.core.chat import SPECIAL_TOKENS
from curate.core.errors import CurateError

logger = logging.getLogger(__name__)

FLAVORS: dict[str, dict] = {
    "debug": {
        "vision": dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            attention_bias=True,
            image_size=448,
            patch_size=14,
        ),
        "text": dict(
            model_type="qwen2",
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            tie_word_embeddings=True,
        ),
        "downsample_ratio": 0.5,
    },
    "1b": {  # InternVL2.5-1B: InternViT-300M-448px-V2_5 + Qwen2.5-0.5B-Instruct
        "vision": dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            attention_bias=True,
            use_qk_norm=False,
            norm_type="layer_norm",
            layer_norm_eps=1e-6,
            layer_scale_init_value=0.1,
            image_size=448,
            patch_size=14,
        ),
        "text": dict(
            model_type="qwen2",
            vocab_size=151674,
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            tie_word_embeddings=False,  # InternVL2.5-1B unties them: 938M parameters, not 802M
        ),
        "downsample_ratio": 0.5,
    },
}

# The trainable parts named by the stages (see ``loop.STAGES``).
PARTS = ("vision", "projector", "llm")


def internvl_config(flavor: str, *, vocab_size: int | None, image_token_id: int):
    """The InternVLConfig of a flavor; ``vocab_size`` None keeps the flavor's own."""
    from transformers import InternVLConfig

    if flavor not in FLAVORS:
        raise ValueError(f"unknown flavor {flavor!r}; known: {', '.join(FLAVORS)}")
    spec = FLAVORS[flavor]
    text = dict(spec["text"])
    if vocab_size is not None:
        text["vocab_size"] = vocab_size
    return InternVLConfig(
        vision_config=dict(spec["vision"]),
        text_config=text,
        image_token_id=image_token_id,
        downsample_ratio=spec["downsample_ratio"],
        image_seq_length=tokens_per_tile_of(spec["vision"], spec["downsample_ratio"]),
        tie_word_embeddings=text.get("tie_word_embeddings", False),
    )


def tokens_per_tile_of(vision: dict, downsample_ratio: float) -> int:
    size, patch = vision.get("image_size", 448), vision.get("patch_size", 14)
    size = size[0] if isinstance(size, (list, tuple)) else size
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    return int((size // patch) ** 2 * downsample_ratio**2)


def tokens_per_tile(config) -> int:
    """``<IMG_CONTEXT>`` tokens one tile becomes: (image_size/patch)² · downsample_ratio²."""
    v = config.vision_config
    return tokens_per_tile_of(
        {"image_size": v.image_size, "patch_size": v.patch_size}, config.downsample_ratio
    )


def image_size(config) -> int:
    size = config.vision_config.image_size
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def ensure_special_tokens(tokenizer) -> list[str]:
    """Add ``<img>``, ``</img>``, ``<IMG_CONTEXT>`` (and the chat markers) when missing."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        tokenizer.add_special_tokens(
            {"additional_special_tokens": missing}, replace_extra_special_tokens=False
        )
    return missing


def image_token_id(tokenizer) -> int:
    from curate.core.chat import IMG_CONTEXT

    return int(tokenizer.convert_tokens_to_ids(IMG_CONTEXT))


def build_model(flavor: str, tokenizer, *, seed: int = 0):
    """A randomly initialised flavor, its vocabulary sized to ``tokenizer``."""
    import torch
    from transformers import InternVLForConditionalGeneration

    ensure_special_tokens(tokenizer)
    config = internvl_config(
        flavor, vocab_size=len(tokenizer), image_token_id=image_token_id(tokenizer)
    )
    torch.manual_seed(seed)
    return InternVLForConditionalGeneration(config)


def load_model(path: str | Path, tokenizer=None):
    """A local HF InternVL directory (``save_pretrained`` format), weights in fp32."""
    import torch
    from transformers import InternVLForConditionalGeneration

    model = InternVLForConditionalGeneration.from_pretrained(
        str(path), dtype=torch.float32, local_files_only=True
    )
    if tokenizer is not None:
        match_tokenizer(model, tokenizer)
    return model


def assemble_model(
    vision_path: str | Path,
    llm_path: str | Path,
    tokenizer,
    *,
    downsample_ratio: float = 0.5,
    seed: int = 0,
):
    """Vision tower from ``vision_path``, LLM from ``llm_path``, a fresh projector.

    ``vision_path`` is an HF ``InternVLVisionModel`` directory or a whole InternVL directory
    (its vision tower is taken, e.g. a stage 1.5 output reused with a larger LLM: progressive
    scaling). ``llm_path`` is an HF causal LM (Qwen2 shapes) directory.
    """
    import torch
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLVisionModel,
    )

    vcfg = AutoConfig.from_pretrained(str(vision_path), local_files_only=True)
    if vcfg.model_type == "internvl":
        vision = load_model(vision_path).model.vision_tower
        downsample_ratio = vcfg.downsample_ratio
    else:
        vision = InternVLVisionModel.from_pretrained(
            str(vision_path), dtype=torch.float32, local_files_only=True
        )
    llm = AutoModelForCausalLM.from_pretrained(
        str(llm_path), dtype=torch.float32, local_files_only=True
    )
    ensure_special_tokens(tokenizer)
    config = InternVLConfig(
        vision_config=vision.config.to_dict(),
        text_config=llm.config.to_dict(),
        image_token_id=image_token_id(tokenizer),
        downsample_ratio=downsample_ratio,
        tie_word_embeddings=bool(getattr(llm.config, "tie_word_embeddings", False)),
    )
    config.image_seq_length = tokens_per_tile(config)
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(vision.state_dict())
    model.model.language_model.load_state_dict(llm.model.state_dict())
    model.lm_head.load_state_dict(llm.lm_head.state_dict())
    if config.tie_word_embeddings:
        model.tie_weights()
    match_tokenizer(model, tokenizer)
    return model


def match_tokenizer(model, tokenizer) -> None:
    """Grow the embeddings to the tokenizer and point ``image_token_id`` at <IMG_CONTEXT>."""
    ensure_special_tokens(tokenizer)
    if model.config.text_config.vocab_size < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.config.image_token_id = image_token_id(tokenizer)


def part_modules(model) -> dict:
    """The three trainable parts of an InternVLForConditionalGeneration."""
    return {
        "vision": [model.model.vision_tower],
        "projector": [model.model.multi_modal_projector],
        "llm": [model.model.language_model, model.lm_head],
    }


def freeze_except(model, trains: tuple[str, ...]) -> None:
    """requires_grad only on the parts in ``trains`` (tied lm_head follows the embeddings)."""
    unknown = set(trains) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)}; known: {PARTS}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, modules in part_modules(model).items():
        if name in trains:
            for m in modules:
                for p in m.parameters():
                    p.requires_grad_(True)


def set_drop_path(model, rate: float) -> None:
    """Stochastic depth on the ViT's residual branches, as InternViT trains (timm DropPath).

    transformers' InternVL vision layers have no drop path, so forward hooks scale each
    layer's attention and MLP branch outputs by a per-tile keep mask / keep probability.
    The rate grows linearly over depth from 0 to ``rate`` (InternViT's ``dpr``). Hooks act
    only in training mode; gradient checkpointing replays them with the same RNG state.
    """
    layers = list(model.model.vision_tower.encoder.layer)
    for i, layer in enumerate(layers):
        layer_rate = rate * i / max(1, len(layers) - 1)
        for branch in (layer.attention, layer.mlp):
            branch._drop_path_rate = layer_rate
            if not hasattr(branch, "_drop_path_hook"):
                branch._drop_path_hook = branch.register_forward_hook(_drop_path_hook)


def _drop_path_hook(module, args, output):
    rate = module._drop_path_rate
    if not module.training or rate <= 0.0:
        return output
    import torch

    x = output[0] if isinstance(output, tuple) else output
    keep = 1.0 - rate
    mask = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device, dtype=x.dtype)
    x = x * mask.bernoulli_(keep).div_(keep)
    return (x, *output[1:]) if isinstance(output, tuple) else x


class AttentionUnavailable(CurateError):
    """The attention asked for cannot run here (flash-attn missing, flex backward on a CPU)."""


@dataclass(frozen=True)
class AttentionChoice:
    """Which packed-attention path a model runs, and why (``loss.py`` describes each)."""

    requested: str  # auto | flash | flex | varlen | sdpa | eager
    impl: str  # the transformers attn_implementation name
    why: str

    def line(self) -> str:
        return f"attention: {self.impl} ({self.why})"


def flash_attn_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def attention_choice(requested: str, device=None, *, backward: bool = True) -> AttentionChoice:
    """The packed attention for ``requested`` on ``device`` (default: CUDA when available).

    auto: flash-attn varlen on a GPU when flash-attn is installed; else on a GPU torch's
    flex attention over a block mask per pack (needs nothing beyond torch); on a CPU the
    per-sample SDPA loop (flex has no backward there). ``backward`` False allows flex on a
    CPU (forward only: tests, the GPU check's smoke run).
    """
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = torch.device(device).type == "cuda"
    if requested == "auto":
        if gpu and flash_attn_installed():
            requested, why = "flash", "auto: flash-attn is installed"
        elif gpu:
            requested, why = "flex", "auto: flash-attn is not installed"
        else:
            requested, why = "varlen", "auto: the CPU fallback"
    else:
        why = "asked for"
    if requested == "flash":
        if not (gpu and flash_attn_installed()):
            raise AttentionUnavailable(
                "attention=flash needs a CUDA GPU and flash-attn (pip install flash-attn "
                "--no-build-isolation); attention=flex needs only torch"
            )
        return AttentionChoice(requested, "flash_attention_2", f"flash-attn varlen, {why}")
    if requested == "flex":
        if backward and not gpu:
            raise AttentionUnavailable(
                f"attention=flex cannot train on {device}: torch's flex attention has no "
                "backward on the CPU; use attention=varlen (or auto)"
            )
        from curate.stages.train.loss import register_flex

        impl = register_flex()
        return AttentionChoice(requested, impl, f"torch flex_attention, block mask per pack, {why}")
    if requested == "varlen":
        from curate.stages.train.loss import register_varlen_sdpa

        impl = register_varlen_sdpa()
        return AttentionChoice(requested, impl, f"one SDPA call per sample, {why}")
    if requested in ("sdpa", "eager"):
        return AttentionChoice(requested, requested, f"one T x T block-diagonal mask, {why}")
    raise AttentionUnavailable(
        f"unknown attention {requested!r}; known: auto, flash, flex, varlen, sdpa, eager"
    )


def resolve_attention(requested: str, device=None, *, backward: bool = True) -> str:
    """The transformers attention implementation name of ``attention_choice`` (logged)."""
    choice = attention_choice(requested, device, backward=backward)
    logger.info(choice.line())
    return choice.impl
