"""The model: flavors, loading and assembling, packed attention isolation, drop path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from curate.stages.train import model as m
from curate.stages.train.data import PackBatches, StepLayout, read_packs
from curate.stages.train.loss import PackedCausalLM, block_causal_mask
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


@pytest.mark.parametrize("attention", ["varlen", "sdpa"])
def test_packed_equals_per_sample(debug_model, token_ids, tiny_images, tmp_path, attention):
    """Packed forward/backward = the sum over samples run alone (fp32, ≤ 1e-5 relative)."""
    rng = np.random.default_rng(3)
    samples = []
    for k, n_img in enumerate((2, 0, 2, 1)):  # several multi-image samples
        ims = [
            image_entry(tiny_images[(k + j) % 4], *[(1, 1), (2, 1), (1, 2)][j % 3])
            for j in range(n_img)
        ]
        samples.append(
            make_sample(
                rng, token_ids, prompt_tokens=10 + 7 * k, answer_tokens=5 + 3 * k, images=ims
            )
        )
    write_packs([samples], tmp_path / "packed")
    write_packs([[s] for s in samples], tmp_path / "single")

    model = debug_model
    impl = m.resolve_attention(attention)
    model.set_attn_implementation(impl)
    module = PackedCausalLM(model, impl)
    kw = dict(
        image_size=448,
        tokens_per_tile=256,
        image_token_id=model.config.image_token_id,
        augment=False,
    )

    def grads_of(table, k):
        model.zero_grad()
        ds = PackBatches(table, StepLayout(len(table)), end_step=len(table), **kw)
        batch = ds[k]
        wce = module(
            **{
                n: batch[n]
                for n in (
                    "input_ids",
                    "position_ids",
                    "targets",
                    "weights",
                    "seq_lens",
                    "pixel_values",
                )
            }
        )
        wce.backward()
        return wce.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    packed_loss, packed = grads_of(read_packs(tmp_path / "packed"), 0)
    single = read_packs(tmp_path / "single")
    ref_loss, ref = torch.zeros(()), {n: torch.zeros_like(g) for n, g in packed.items()}
    for k in range(len(single)):
        loss, g = grads_of(single, k)
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
