"""One packed sequence through the model, with InternVL's loss reweighting and no
cross-sample attention.

Samples in a pack must not see each other: position ids restart at every sample, and attention
is block-diagonal causal, in one of these exact ways (``model.attention_choice`` picks one):

- ``flash_attention_2`` (GPU with flash-attn installed, the first choice): the language model
  gets ``cu_seq_lens_q/k`` and ``max_length_q/k`` (transformers' FlashAttentionKwargs) and runs
  flash-attn varlen.
- ``flex_varlen`` (GPU without flash-attn, the default there): torch's compiled
  ``flex_attention`` over a ``BlockMask`` made from the pack's sample lengths
  (``packed_block_mask``: causal inside each sample, nothing across). The mask is made once per
  pack, on the host from the lengths alone (no T x T mask is ever formed), and every layer
  shares it: a 4-D mask reaches the layers as it is (``masking_utils._preprocess_mask_arguments``).
  Grouped-query attention runs in the kernel (no K/V copies). torch has no flex backward on
  the CPU, so there it can only run forward (the tests check it there, compiled and not).
- ``sdpa_varlen`` (the CPU default): ``varlen_sdpa_attention``, SDPA causally on each sample's
  slice with ``enable_gqa`` (no K/V copies): Σ L_k² work, no T x T mask, one call per sample.
- ``sdpa`` / ``eager``: an explicit 4-D mask ``(1, 1, T, T)``, True where query and key are in
  the same sample and key ≤ query. transformers' ``create_causal_mask`` returns a 4-D mask as
  it is; SDPA takes it boolean, eager additive. T² memory: for tests and small packs.

The position-id heuristic of ``masking_utils.find_packed_sequence_indices`` is not relied on:
it is skipped as soon as any mask is passed, and it guesses boundaries from positions rather
than being told.

Loss: a supervised token of a sample with x supervised tokens has weight w = 1 (token), 1/x
(sample) or 1/√x (square, the default); the module returns Σ w·CE over its sequence and the
loop divides by Σw of the whole optimizer step (all ranks, all accumulation steps), so the
result is ``Σ w·CE / Σ w`` however the packs are split. Logits are computed only at the
supervised positions (a 16k-token pack × 151k vocabulary would be 10 GB of fp32 logits); in
bf16 they are upcast before the cross-entropy, and the weights, the CE and its sum stay fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from curate.core.chat import IGNORE_INDEX


def block_causal_mask(seq_lens: torch.Tensor, device=None) -> torch.Tensor:
    """(1, 1, T, T) bool: True where key and query are in the same sample and key ≤ query."""
    lens = seq_lens.to(device=device, dtype=torch.long)
    sample = torch.repeat_interleave(torch.arange(len(lens), device=device), lens)
    t = torch.arange(int(lens.sum()), device=device)
    return ((sample[:, None] == sample[None, :]) & (t[None, :] <= t[:, None]))[None, None]


def varlen_sdpa_attention(
    module,
    query,
    key,
    value,
    attention_mask,
    scaling=None,
    dropout=0.0,
    cu_seq_lens_q=None,
    **kwargs,
):
    """SDPA per sample (``cu_seq_lens_q`` bounds), causal inside each: no T² mask or scores.

    Registered as the ``sdpa_varlen`` attention implementation. Exact like the masked form,
    with Σ L_k² instead of T² attention work and memory; without ``cu_seq_lens_q`` (the vision
    tower) it is plain SDPA.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if cu_seq_lens_q is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    # Grouped-query attention inside SDPA: no repeated K/V (7 copies on the 1b flavor).
    gqa = query.shape[1] != key.shape[1]
    lens = cu_seq_lens_q.diff().tolist()
    causal = bool(getattr(module, "is_causal", True))
    # split (not slicing): its backward is one cat, where slices would each scatter into a
    # zeroed full-size gradient.
    out = torch.cat(
        [
            F.scaled_dot_product_attention(
                q, k, v, is_causal=causal, scale=scaling, dropout_p=dropout, enable_gqa=gqa
            )
            for q, k, v in zip(
                query.split(lens, 2), key.split(lens, 2), value.split(lens, 2), strict=True
            )
        ],
        dim=2,
    )
    return out.transpose(1, 2).contiguous(), None


def register_varlen_sdpa() -> str:
    from transformers import AttentionInterface

    AttentionInterface.register("sdpa_varlen", varlen_sdpa_attention)
    return "sdpa_varlen"


# --- flex attention over a block mask made from the sample lengths ------------------------------

FLEX_BLOCK = 128  # flex_attention's default sparse block (tokens per side of a mask block)


@dataclass(frozen=True)
class FlexMode:
    """How ``flex_varlen`` runs torch's flex_attention.

    ``compiled`` False is eager flex, a reference implementation that forms every score (CPU
    tests only). Packs differ in length, so a compiled kernel either takes the length as a
    dynamic size (``dynamic``: one compilation for every length) or sees a few static lengths:
    ``bucket_tokens`` > 0 pads each pack to a multiple of it inside attention (the padding is
    one extra sample that nothing real sees), so a 16k cap gives at most 16384 / bucket
    kernels. torch 2.13's CPU code generation fails on dynamic flex; which of the two serves
    a GPU best is what ``bench/gpu_check.py`` measures.
    """

    compiled: bool = True
    dynamic: bool = True
    bucket_tokens: int = 0


_FLEX: dict[str, object] = {"mode": FlexMode()}


def flex_mode() -> FlexMode:
    return _FLEX["mode"]  # type: ignore[return-value]


def packed_block_mask(seq_lens: torch.Tensor, device=None, *, bucket_tokens: int = 0):
    """The flex ``BlockMask`` of a pack: causal inside each sample, nothing across samples.

    Made from the lengths alone: sample ids are monotonic along the pack, so a key block can
    reach a query block only if it is not later and its last sample is not before the query
    block's first one, and it is fully visible when it is earlier and both blocks lie whole in
    one sample. That is an (T/128)² table (128² at 16k tokens) instead of the T² evaluations of
    ``create_block_mask``; the element mask (``mask_mod``) is only read on partial blocks.
    With ``bucket_tokens`` the mask spans the pack padded to a multiple of it (and always to
    at least one block), the padding being one more sample.
    """
    from torch.nn.attention.flex_attention import BlockMask

    lens = seq_lens.detach().to("cpu", torch.long)
    total = int(lens.sum())
    padded = -(-total // bucket_tokens) * bucket_tokens if bucket_tokens else total
    # Under one block flex takes its decoding kernel, which wants a power-of-2 number of
    # query heads per K/V head (the 1b flavor has 7): a pack that short is padded to a block.
    padded = max(padded, FLEX_BLOCK)
    if padded > total:
        lens = torch.cat([lens, torch.tensor([padded - total])])
    n = -(-padded // FLEX_BLOCK)
    # Sample id per token, padded to whole blocks with one more id: the kernel may read
    # positions past the end in the last block, and those must match nothing real.
    sample = torch.repeat_interleave(torch.arange(len(lens)), lens)
    sample = F.pad(sample, (0, n * FLEX_BLOCK - padded), value=len(lens))
    starts = torch.arange(n) * FLEX_BLOCK
    first = sample[starts]
    last = sample[torch.clamp(starts + FLEX_BLOCK - 1, max=padded - 1)]
    q_blk, kv_blk = torch.arange(n)[:, None], torch.arange(n)[None, :]
    reach = (kv_blk <= q_blk) & (last[None, :] >= first[:, None])
    # A block cut by the end is never full (as ``create_block_mask`` makes it): the kernel
    # then applies the element mask there, which keeps positions past the end out.
    whole = starts + FLEX_BLOCK <= padded
    full = (kv_blk < q_blk) & (first[None, :] == last[:, None]) & whole[:, None] & whole[None, :]

    def ordered(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # BlockMask's layout: per query block, the count, then the key blocks visible first.
        d = dense.to(torch.int32)
        idx = torch.argsort(d, dim=-1, descending=True, stable=True).to(torch.int32)
        return d.sum(-1).to(torch.int32)[None, None].to(device), idx[None, None].to(device)

    sample_on = sample.to(device=device, dtype=torch.int32)

    def mask_mod(b, h, q_idx, kv_idx):
        return (sample_on[q_idx] == sample_on[kv_idx]) & (kv_idx <= q_idx)

    kv_num, kv_idx = ordered(reach & ~full)
    full_num, full_idx = ordered(full)
    return BlockMask.from_kv_blocks(
        kv_num,
        kv_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=FLEX_BLOCK,
        mask_mod=mask_mod,
        seq_lengths=(padded, padded),
    )


def flex_kernel(mode: FlexMode):
    """torch's ``flex_attention`` as ``mode`` runs it, compiled once per process and mode."""
    from torch.nn.attention.flex_attention import flex_attention

    if not mode.compiled:
        return flex_attention
    key = f"kernel-{mode.dynamic}"
    if key not in _FLEX:
        _FLEX[key] = torch.compile(flex_attention, dynamic=mode.dynamic)
    return _FLEX[key]


def flex_varlen_attention(
    module,
    query,
    key,
    value,
    attention_mask,
    scaling=None,
    dropout=0.0,
    **kwargs,
):
    """flex attention with the pack's ``BlockMask`` (registered as ``flex_varlen``).

    Without a BlockMask (the vision tower: full attention inside each tile) it is plain SDPA.
    Grouped-query attention happens in the kernel (``enable_gqa``), not by copying K/V.
    """
    from torch.nn.attention.flex_attention import BlockMask
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not isinstance(attention_mask, BlockMask):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    if dropout:
        raise ValueError("flex_varlen attention has no attention dropout")
    length = query.shape[2]
    pad = attention_mask.seq_lengths[0] - length  # > 0 when the mask spans a bucket
    if pad:
        query, key, value = (F.pad(x, (0, 0, 0, pad)) for x in (query, key, value))
    out = flex_kernel(flex_mode())(
        query,
        key,
        value,
        block_mask=attention_mask,
        scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out[:, :, :length].transpose(1, 2).contiguous(), None


def register_flex(mode: FlexMode | None = None) -> str:
    """Register ``flex_varlen`` (process-wide); ``mode`` None keeps the mode set before
    (initially compiled with a dynamic length: the GPU default)."""
    from transformers import AttentionInterface

    if mode is not None:
        _FLEX["mode"] = mode
    AttentionInterface.register("flex_varlen", flex_varlen_attention)
    return "flex_varlen"


def embed_with_images(inner, input_ids: torch.Tensor, vision) -> torch.Tensor:
    """Token embeddings with the image features in the ``<IMG_CONTEXT>`` positions, in order
    (what ``InternVLModel.forward`` does). Done here so that the features computed first reach
    the language model on every transformers 5: ``mm_encoder_outputs`` exists from 5.19 on,
    and 5.17 (the GPU machine's) would pass it on unread and train without the images.
    """
    embeds = inner.get_input_embeddings()(input_ids)
    if vision is None:
        return embeds
    features = vision.pooler_output.to(embeds.device, embeds.dtype)
    slots = (input_ids == inner.config.image_token_id)[..., None].expand_as(embeds)
    return embeds.masked_scatter(slots, features)


def flash_kwargs(seq_lens: torch.Tensor, device) -> dict:
    """FlashAttentionKwargs for varlen attention over the samples of one sequence."""
    cu = F.pad(torch.cumsum(seq_lens.to(device=device, dtype=torch.int32), 0), (1, 0))
    longest = int(seq_lens.max())
    return {
        "cu_seq_lens_q": cu.to(torch.int32),
        "cu_seq_lens_k": cu.to(torch.int32),
        "max_length_q": longest,
        "max_length_k": longest,
    }


class PackedCausalLM(nn.Module):
    """Wraps InternVLForConditionalGeneration; forward(batch) → Σ w·CE of one sequence.

    DDP/FSDP wrap this module, so gradient synchronisation sees the whole computation. A
    sequence without images still runs the vision tower on one blank tile (its features times
    zero join the loss), as InternVL does, so every rank uses every parameter.
    """

    def __init__(self, model, attention: str = "sdpa"):
        super().__init__()
        self.model = model
        self.attention = attention

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        targets: torch.Tensor,
        weights: torch.Tensor,
        seq_lens: torch.Tensor,
        pixel_values: torch.Tensor,
    ) -> torch.Tensor:
        inner = self.model.model
        device = input_ids.device
        kwargs: dict = {}
        if self.attention in ("flash_attention_2", "sdpa_varlen"):
            # varlen_sdpa_attention reads the bounds on the host: keep them there (no syncs).
            on = device if self.attention == "flash_attention_2" else torch.device("cpu")
            kwargs.update(flash_kwargs(seq_lens, on))
            mask = None
        elif self.attention == "flex_varlen":
            # Once per pack, shared by every layer of the language model.
            mask = packed_block_mask(seq_lens, device, bucket_tokens=flex_mode().bucket_tokens)
        else:
            mask = block_causal_mask(seq_lens, device)
            if self.attention == "eager":
                mask = torch.zeros(mask.shape, device=device).masked_fill_(
                    ~mask, torch.finfo(torch.float32).min
                )
        # The vision tower runs first on every rank, on a blank tile when the sequence has no
        # image (InternVL's dummy tile), so DDP sees every parameter used and FSDP's
        # collectives come in the same order on all ranks.
        has_images = pixel_values.shape[0] > 0
        pixels = (
            pixel_values
            if has_images
            else torch.zeros((1, *pixel_values.shape[1:]), device=device, dtype=pixel_values.dtype)
        )
        vision = inner.get_image_features(pixel_values=pixels, return_dict=True)
        embeds = embed_with_images(inner, input_ids[None], vision if has_images else None)
        out = inner.language_model(
            inputs_embeds=embeds,
            position_ids=position_ids[None],
            attention_mask=mask,
            use_cache=False,
            **kwargs,
        )
        hidden = out.last_hidden_state[0]
        keep = targets != IGNORE_INDEX
        logits = self.model.lm_head(hidden[keep]).float()
        ce = F.cross_entropy(logits, targets[keep], reduction="none")
        total = (ce * weights[keep].float()).sum()
        if not has_images:
            total = total + 0.0 * vision.pooler_output.float().sum()
        return total
