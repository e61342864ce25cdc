"""The model: flavors, loading and assembling, packed attention isolation, drop path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from curate.stages.train import model as m
from curate.stages.train.data import PackBatches, StepLayout, read_packs
from curate.stages.train.loss import (
    FLEX_BLOCK,
    FlexMode,
    PackedCausalLM,
    block_causal_mask,
    flash_kwargs,
    packed_block_mask,
    register_flex,
)
from curate.stages.train.synthetic import image_entry, make_sample, write_packs
from tests.stages.train.conftest import make_tiny_packs


@pytest.fixture(scope="module")
def tokenizer(train_tokenizer):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(train_tokenizer)


@pytest.fixture(scope="module")
def debug_model(tokenizer):
    return m.build_model("debug", tokenizer, seed=0)


def test_debug_flavor_is_internvl_shaped(debug_model, tokenizer):
    cfg = debug_model.config
    assert m.tokens_per_tile(cfg) == 256 and m.image_size(cfg) == 448
    assert cfg.image_token_id == tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    proj = debug_model.model.multi_modal_projector
    c, d = cfg.vision_config.hidden_size, cfg.text_config.hidden_size
    assert proj.layer_norm.normalized_shape == (4 * c,)
    assert (proj.linear_1.in_features, proj.linear_1.out_features) == (4 * c, d)
    assert (proj.linear_2.in_features, proj.linear_2.out_features) == (d, d)
    with torch.no_grad():
        feats = debug_model.get_image_features(torch.zeros(2, 3, 448, 448)).pooler_output
    assert feats.shape == (2, 256, d)


def test_1b_flavor_shapes():
    cfg = m.internvl_config("1b", vocab_size=None, image_token_id=151667)
    assert cfg.vision_config.hidden_size == 1024 and cfg.vision_config.num_hidden_layers == 24
    assert cfg.text_config.hidden_size == 896 and cfg.text_config.num_key_value_heads == 2
    assert cfg.text_config.vocab_size == 151674 and m.tokens_per_tile(cfg) == 256


def test_1b_flavor_has_internvl2_5_1b_parameter_count():
    """InternVL2.5-1B has 938M parameters (untied input and output embeddings of the 151,674
    token vocabulary); counted on the meta device, so no weights are allocated."""
    from transformers import InternVLForConditionalGeneration

    cfg = m.internvl_config("1b", vocab_size=None, image_token_id=151667)
    with torch.device("meta"):
        model = InternVLForConditionalGeneration(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert round(n / 1e6) == 938, n
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight


def test_save_load_and_assemble(debug_model, tokenizer, tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    debug_model.save_pretrained(tmp_path / "full")
    loaded = m.load_model(tmp_path / "full", tokenizer)
    for (n, a), b in zip(
        debug_model.state_dict().items(), loaded.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), n
    # Progressive scaling: the ViT of this model with another (fresh) LLM and a new projector.
    llm = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=len(tokenizer) - 3,
            hidden_size=96,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        )
    )
    llm.save_pretrained(tmp_path / "llm")
    big = m.assemble_model(tmp_path / "full", tmp_path / "llm", tokenizer)
    assert big.config.text_config.hidden_size == 96
    assert big.config.text_config.vocab_size >= len(tokenizer)  # grown to the tokenizer
    for a, b in zip(
        debug_model.model.vision_tower.state_dict().values(),
        big.model.vision_tower.state_dict().values(),
        strict=True,
    ):
        assert torch.equal(a, b)
    layer = big.model.language_model.layers[0].self_attn.q_proj.weight
    assert torch.equal(layer, llm.model.layers[0].self_attn.q_proj.weight)
    assert big.model.multi_modal_projector.linear_2.out_features == 96
    # A bare vision tower directory works the same way.
    debug_model.model.vision_tower.save_pretrained(tmp_path / "vit")
    again = m.assemble_model(tmp_path / "vit", tmp_path / "llm", tokenizer)
    vit = again.model.vision_tower.embeddings.patch_embeddings.projection.weight
    assert torch.equal(
        vit, debug_model.model.vision_tower.embeddings.patch_embeddings.projection.weight
    )


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _packed_and_single(token_ids, tiny_images, root, prompt_scale: int = 7):
    """The same 4 samples (several multi-image) as one pack and as 4 one-sample packs."""
    rng = np.random.default_rng(3)
    samples = []
    for k, n_img in enumerate((2, 0, 2, 1)):
        ims = [
            image_entry(tiny_images[(k + j) % 4], *[(1, 1), (2, 1), (1, 2)][j % 3])
            for j in range(n_img)
        ]
        samples.append(
            make_sample(
                rng,
                token_ids,
                prompt_tokens=10 + prompt_scale * k,
                answer_tokens=5 + 3 * k,
                images=ims,
            )
        )
    write_packs([samples], root / "packed")
    write_packs([[s] for s in samples], root / "single")
    return read_packs(root / "packed"), read_packs(root / "single")


BATCH_KEYS = ("input_ids", "position_ids", "targets", "weights", "seq_lens", "pixel_values")


def _batches(table, model) -> list[dict]:
    ds = PackBatches(
        table,
        StepLayout(len(table)),
        end_step=len(table),
        image_size=448,
        tokens_per_tile=256,
        image_token_id=model.config.image_token_id,
        augment=False,
    )
    return [ds[k] for k in range(len(ds))]


@pytest.mark.parametrize("attention", ["varlen", "sdpa", "eager"])
def test_packed_equals_per_sample(debug_model, token_ids, tiny_images, tmp_path, attention):
    """Packed forward/backward = the sum over samples run alone (fp32, ≤ 1e-5 relative), for
    every attention path that trains on the CPU (flex: forward only, below)."""
    packed_table, single_table = _packed_and_single(token_ids, tiny_images, tmp_path)
    model = debug_model
    impl = m.resolve_attention(attention)
    model.set_attn_implementation(impl)
    module = PackedCausalLM(model, impl)

    def grads_of(batch):
        model.zero_grad()
        wce = module(**{n: batch[n] for n in BATCH_KEYS})
        wce.backward()
        return wce.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    packed_loss, packed = grads_of(_batches(packed_table, model)[0])
    ref_loss, ref = torch.zeros(()), {n: torch.zeros_like(g) for n, g in packed.items()}
    for batch in _batches(single_table, model):
        loss, g = grads_of(batch)
        ref_loss += loss
        for n in ref:
            ref[n] += g[n]
    assert _rel(packed_loss, ref_loss) <= 1e-5
    everything = torch.cat([g.flatten() for g in ref.values()])
    assert _rel(torch.cat([g.flatten() for g in packed.values()]), everything) <= 1e-5
    floor = 1e-6 * float(everything.norm())  # e.g. key biases: zero gradient, float noise
    for n in ref:
        if ref[n].norm() > floor:
            assert _rel(packed[n], ref[n]) <= 1e-5, n
        else:
            assert float(packed[n].norm()) <= floor, n
    model.set_attn_implementation("sdpa")


def test_block_mask_is_what_isolates_samples(debug_model):
    """A plain causal mask over the pack lets the second sample see the first."""
    torch.manual_seed(0)
    lens = torch.tensor([12, 9])
    ids = torch.randint(10, 300, (1, 21))
    pos = torch.cat([torch.arange(12), torch.arange(9)])[None]
    with torch.no_grad():
        alone = debug_model.model(input_ids=ids[:, 12:], use_cache=False).last_hidden_state
        masked = debug_model.model(
            input_ids=ids, position_ids=pos, use_cache=False, attention_mask=block_causal_mask(lens)
        ).last_hidden_state
        causal = debug_model.model(
            input_ids=ids,
            position_ids=pos,
            use_cache=False,
            attention_mask=torch.ones(1, 21, dtype=torch.long),
        ).last_hidden_state
    assert torch.allclose(masked[:, 12:], alone, atol=1e-5)
    assert not torch.allclose(causal[:, 12:], alone, atol=1e-3)


def test_drop_path_only_in_training(tokenizer):
    model = m.build_model("debug", tokenizer, seed=1)
    x = torch.randn(4, 3, 448, 448)
    with torch.no_grad():
        model.eval()
        before = model.get_image_features(x).pooler_output
        m.set_drop_path(model, 0.5)
        rates = [layer.mlp._drop_path_rate for layer in model.model.vision_tower.encoder.layer]
        assert rates == [0.0, 0.5]  # linear over depth, InternViT's dpr
        assert torch.equal(model.get_image_features(x).pooler_output, before)
        model.train()
        torch.manual_seed(0)
        assert not torch.allclose(model.get_image_features(x).pooler_output, before)
        m.set_drop_path(model, 0.0)
        assert torch.allclose(model.get_image_features(x).pooler_output, before)


def test_freeze_except_parts(debug_model):
    m.freeze_except(debug_model, ("projector",))
    trainable = {n.split(".")[1] for n, p in debug_model.named_parameters() if p.requires_grad}
    assert trainable == {"multi_modal_projector"}
    m.freeze_except(debug_model, m.PARTS)
    assert all(p.requires_grad for p in debug_model.parameters())
    with pytest.raises(ValueError):
        m.freeze_except(debug_model, ("decoder",))


def test_tiny_manifest_helper(tmp_path, token_ids, tiny_images):
    table = read_packs(make_tiny_packs(tmp_path / "packs", token_ids, tiny_images))
    assert table.column("pack_id").to_pylist() == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "mode",
    [
        FlexMode(compiled=False),
        # torch 2.13's CPU code generation fails on dynamic-length flex: static lengths here.
        FlexMode(compiled=True, dynamic=False, bucket_tokens=2048),
    ],
    ids=["eager", "compiled"],
)
def test_flex_packed_equals_per_sample(debug_model, token_ids, tiny_images, tmp_path, mode):
    """flex attention over the pack's block mask: packed loss = Σ per-sample losses (fp32,
    ≤ 1e-5), forward only (torch has no flex backward on the CPU); the compiled kernel of a
    bucket is made once and serves every pack length in it."""
    from torch._dynamo.utils import counters

    packed, single = _packed_and_single(token_ids, tiny_images, tmp_path, prompt_scale=300)
    model = debug_model
    impl = m.resolve_attention("flex", "cpu", backward=False)
    register_flex(mode)
    model.set_attn_implementation(impl)
    module = PackedCausalLM(model, impl)
    try:
        with torch.no_grad():
            batch = _batches(packed, model)[0]
            assert int(batch["seq_lens"].max()) > 2 * FLEX_BLOCK  # samples span mask blocks
            got = module(**{k: batch[k] for k in BATCH_KEYS})
            ref, graphs = torch.zeros(()), []
            for b in _batches(single, model):
                ref += module(**{k: b[k] for k in BATCH_KEYS})
                graphs.append(counters["stats"]["unique_graphs"])
            if mode.compiled:  # four lengths, one bucket: one kernel serves them all
                assert len(set(graphs)) == 1, graphs
            varlen = m.resolve_attention("varlen")
            model.set_attn_implementation(varlen)
            same = PackedCausalLM(model, varlen)(**{k: batch[k] for k in BATCH_KEYS})
    finally:
        register_flex(FlexMode())
        model.set_attn_implementation("sdpa")
    assert _rel(got, ref) <= 1e-5
    assert _rel(got, same) <= 1e-5


@pytest.mark.parametrize(
    "lens",
    [[37, 100, 5, 200], [128, 128], [1], [300], [129, 1, 127, 256, 3], [700, 9, 640, 1, 513]],
)
@pytest.mark.parametrize("bucket", [0, 1024])
def test_packed_block_mask_is_create_block_mask(lens, bucket):
    """The block mask made from the lengths alone is the one ``create_block_mask`` makes by
    evaluating the element mask everywhere (same partial and full blocks), padding included."""
    from torch.nn.attention.flex_attention import create_block_mask

    seq = torch.tensor(lens)
    total = int(seq.sum())
    padded = max(FLEX_BLOCK, -(-total // bucket) * bucket if bucket else total)
    sample = torch.repeat_interleave(
        torch.arange(len(lens) + 1), torch.tensor([*lens, padded - total])
    )

    def mask_mod(b, h, q, kv):
        return (sample[q] == sample[kv]) & (kv <= q)

    ref = create_block_mask(mask_mod, None, None, padded, padded, device="cpu")
    got = packed_block_mask(seq, "cpu", bucket_tokens=bucket)
    assert got.seq_lengths == (padded, padded)
    assert torch.equal(got.kv_num_blocks, ref.kv_num_blocks)
    assert torch.equal(got.full_kv_num_blocks, ref.full_kv_num_blocks)
    for num, idx, ref_idx in (
        (got.kv_num_blocks, got.kv_indices, ref.kv_indices),
        (got.full_kv_num_blocks, got.full_kv_indices, ref.full_kv_indices),
    ):
        for row, n in enumerate(num[0, 0].tolist()):
            assert torch.equal(idx[0, 0, row, :n], ref_idx[0, 0, row, :n])
    # The element mask over the real tokens: causal inside each sample, nothing across.
    t = torch.arange(total)
    assert torch.equal(got.mask_mod(0, 0, t[:, None], t[None, :]), block_causal_mask(seq)[0, 0])


def test_varlen_sdpa_shares_kv_heads(debug_model, monkeypatch):
    """Grouped-query attention in the per-sample loop: SDPA gets the 2 K/V heads as they are
    (enable_gqa), not 4 repeated copies."""
    from torch.nn import functional as F

    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append((q.shape[1], k.shape[1], kwargs.get("enable_gqa", False)))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    impl = m.resolve_attention("varlen")
    debug_model.set_attn_implementation(impl)
    lens = torch.tensor([5, 7])
    try:
        with torch.no_grad():
            debug_model.model.language_model(
                input_ids=torch.randint(10, 300, (1, 12)),
                position_ids=torch.cat([torch.arange(5), torch.arange(7)])[None],
                use_cache=False,
                **flash_kwargs(lens, "cpu"),
            )
    finally:
        debug_model.set_attn_implementation("sdpa")
    assert seen and set(seen) == {(4, 2, True)}


def test_attention_choice(monkeypatch):
    """auto: flash-attn varlen on a GPU that has it, flex on a GPU without it, the SDPA loop
    on a CPU; a path that cannot run here is a one-line error, not a traceback later."""
    monkeypatch.setattr(m, "flash_attn_installed", lambda: True)
    assert m.attention_choice("auto", "cuda").impl == "flash_attention_2"
    monkeypatch.setattr(m, "flash_attn_installed", lambda: False)
    gpu = m.attention_choice("auto", "cuda")
    assert gpu.impl == "flex_varlen" and "flash-attn is not installed" in gpu.line()
    cpu = m.attention_choice("auto", "cpu")
    assert cpu.impl == "sdpa_varlen" and cpu.line().startswith("attention: sdpa_varlen")
    assert m.attention_choice("sdpa", "cuda").impl == "sdpa"
    with pytest.raises(m.AttentionUnavailable, match="flash-attn"):
        m.attention_choice("flash", "cuda")
    with pytest.raises(m.AttentionUnavailable, match="no backward on the CPU"):
        m.attention_choice("flex", "cpu")
    assert m.attention_choice("flex", "cpu", backward=False).impl == "flex_varlen"


@pytest.mark.parametrize("attention", ["varlen", "sdpa"])
def test_packed_equals_per_sample_in_bf16(debug_model, token_ids, tiny_images, tmp_path, attention):
    """Under bf16 autocast (as the trainer runs on a GPU) the packed loss stays within bf16
    rounding of the per-sample sum (the goal: ≤ 1e-2 relative), and comes back fp32."""
    packed_table, single_table = _packed_and_single(token_ids, tiny_images, tmp_path)
    model = debug_model
    impl = m.resolve_attention(attention)
    model.set_attn_implementation(impl)
    module = PackedCausalLM(model, impl)
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            got = module(**{k: _batches(packed_table, model)[0][k] for k in BATCH_KEYS})
            ref = sum(
                module(**{k: b[k] for k in BATCH_KEYS}) for b in _batches(single_table, model)
            )
        with torch.no_grad():
            fp32 = module(**{k: _batches(packed_table, model)[0][k] for k in BATCH_KEYS})
    finally:
        model.set_attn_implementation("sdpa")
    assert got.dtype == torch.float32
    assert _rel(got, ref) <= 1e-2
    assert 0 < _rel(got, fp32) <= 2e-2  # bf16 did run


def test_packed_forward_feeds_the_image_features_itself(debug_model, monkeypatch):
    """The packed forward puts the tiles' features into the <IMG_CONTEXT> embeddings itself
    and calls the language model, never ``InternVLModel.forward``: transformers 5.17 (the GPU
    machine's) has no ``mm_encoder_outputs`` there and would train without the images."""
    from transformers.models.internvl.modeling_internvl import InternVLModel

    def refuse(*args, **kwargs):
        raise AssertionError("InternVLModel.forward differs between transformers 5 releases")

    ctx = debug_model.config.image_token_id
    ids = torch.tensor([7, 8, *[ctx] * 256, 9, 10, 11])
    batch = {
        "input_ids": ids,
        "position_ids": torch.arange(len(ids)),
        "targets": torch.cat([ids[1:], torch.tensor([-100])]).masked_fill(ids == ctx, -100),
        "weights": torch.ones(len(ids)),
        "seq_lens": torch.tensor([len(ids)], dtype=torch.int32),
    }
    module = PackedCausalLM(debug_model, "sdpa")
    torch.manual_seed(0)
    tiles = torch.randn(2, 1, 3, 448, 448)
    with torch.no_grad():
        expected = [
            float(
                debug_model(input_ids=ids[None], pixel_values=t, use_cache=False)
                .logits[0, :-1]
                .log_softmax(-1)[torch.arange(len(ids) - 1), batch["targets"][:-1].clamp_min(0)]
                .masked_fill(batch["targets"][:-1] == -100, 0)
                .sum()
            )
            for t in tiles
        ]
        monkeypatch.setattr(InternVLModel, "forward", refuse)
        got = [float(module(**batch, pixel_values=t)) for t in tiles]
    assert got[0] == pytest.approx(-expected[0], rel=1e-5)
    assert got[1] == pytest.approx(-expected[1], rel=1e-5)
    assert abs(got[0] - got[1]) > 1e-4  # the pixels reach the loss
