"""Tiny local models for tests and the demo: a BPE tokenizer with InternVL's special tokens and
chat template, and a random-weight Qwen2 judge for the scoring stage.

Weights cannot be downloaded on the machines this runs on, so these stand in for
Qwen2.5-0.5B-Instruct; the code that loads them is the same code that loads the real ones.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from curate.core.chat import CHAT_TEMPLATE, IM_END, SPECIAL_TOKENS

TOKENIZER_VOCAB_SIZE = 2048


def _corpus_lines() -> list[str]:
    from curate.demo.text import training_corpus

    return training_corpus()


def build_tokenizer(
    out_dir: str | Path, corpus: Iterable[str] | None = None, vocab_size: int = TOKENIZER_VOCAB_SIZE
) -> Path:
    """Train a byte-level BPE tokenizer and save it in Hugging Face format at ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", *SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus) if corpus is not None else _corpus_lines(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS,
        model_max_length=32768,
    )
    fast.chat_template = CHAT_TEMPLATE
    out = Path(out_dir)
    fast.save_pretrained(out)
    return out


def build_judge_llm(
    out_dir: str | Path,
    tokenizer_dir: str | Path,
    *,
    seed: int = 0,
    hidden_size: int = 128,
    intermediate_size: int = 256,
    num_layers: int = 2,
    num_heads: int = 4,
) -> Path:
    """A random-weight Qwen2ForCausalLM (558k parameters by default) saved with its tokenizer.

    head_dim (hidden_size / num_heads) must be at least 32: vLLM's CPU attention supports no
    smaller head size.
    """
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    model = Qwen2ForCausalLM(config)
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
