"""InternVL's loss reweighting: exact weights, and a loss independent of how packs are split."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from curate.core.chat import IGNORE_INDEX
from curate.stages.train.data import PackBatches, StepLayout, loss_weight, read_packs
from curate.stages.train.loop import micro_step
from curate.stages.train.loss import PackedCausalLM
from curate.stages.train.synthetic import make_sample, write_packs

BATCH_KEYS = ("input_ids", "position_ids", "targets", "weights", "seq_lens", "pixel_values")


@pytest.fixture(scope="module")
def two_sample_pack(tmp_path_factory, token_ids):
    """One pack: a sample with 4 supervised tokens, one with 9 (answers 3 and 8 + <|im_end|>)."""
    rng = np.random.default_rng(0)
    a = make_sample(rng, token_ids, prompt_tokens=6, answer_tokens=3)
    b = make_sample(rng, token_ids, prompt_tokens=5, answer_tokens=8)
    assert (a.supervised, b.supervised) == (4, 9)
    return read_packs(write_packs([[a, b]], tmp_path_factory.mktemp("w") / "packs"))


@pytest.mark.parametrize(
    ("reduction", "w_a", "w_b", "total"),
    [
        ("square", 1 / 2, 1 / 3, 4 / 2 + 9 / 3),
        ("sample", 1 / 4, 1 / 9, 2.0),
        ("token", 1.0, 1.0, 13.0),
    ],
)
def test_weights_by_hand(two_sample_pack, token_ids, reduction, w_a, w_b, total):
    ds = PackBatches(
        two_sample_pack,
        StepLayout(1),
        end_step=1,
        image_size=448,
        tokens_per_tile=256,
        image_token_id=token_ids.img_context,
        reduction=reduction,
    )
    batch = ds[0]
    la, lb = batch["seq_lens"].tolist()
    sup = batch["targets"] != IGNORE_INDEX
    w = batch["weights"]
    assert torch.allclose(w[:la][sup[:la]], torch.full((4,), w_a))
    assert torch.allclose(w[la:][sup[la:]], torch.full((9,), w_b))
    assert (w[~sup] == 0).all()
    assert float(batch["weight_sum"]) == pytest.approx(total, rel=1e-12)
    assert np.allclose(loss_weight([4, 9], reduction), [w_a, w_b])


def test_loss_is_weighted_mean_of_ce(two_sample_pack, token_ids, train_tokenizer):
    """Σ w·CE / Σ w with w = 1/√x, against CE taken from the model's full logits."""
    from transformers import AutoTokenizer

    from curate.stages.train.model import build_model

    model = build_model("debug", AutoTokenizer.from_pretrained(train_tokenizer), seed=0)
    ds = PackBatches(
        two_sample_pack,
        StepLayout(1),
        end_step=1,
        image_size=448,
        tokens_per_tile=256,
        image_token_id=token_ids.img_context,
    )
    batch = ds[0]
    with torch.no_grad():
        got = PackedCausalLM(model)(**{k: batch[k] for k in BATCH_KEYS}) / batch["weight_sum"]
        la, lb = batch["seq_lens"].tolist()
        expected_num = 0.0
        for start, n, x in ((0, la, 4), (la, lb, 9)):
            ids = batch["input_ids"][start : start + n]
            logits = model(input_ids=ids[None]).logits[0]
            labels = batch["targets"][start : start + n]  # already shifted
            ce = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
            expected_num += float(ce) / x**0.5
    assert float(got) == pytest.approx(expected_num / (4 / 2 + 9 / 3), rel=1e-5)


def test_loss_invariant_to_splitting(tiny_run, token_ids, train_tokenizer):
    """4 packs per step as 4×1, 1×4 accumulation, or 2 ranks × 2: same loss and gradients."""
    from transformers import AutoTokenizer

    from curate.stages.train.model import build_model, resolve_attention

    model = build_model("debug", AutoTokenizer.from_pretrained(train_tokenizer), seed=0)
    model.set_attn_implementation(resolve_attention("varlen"))
    module = PackedCausalLM(model, "sdpa_varlen")
    table = read_packs(tiny_run / "packs")
    results = []
    for batch_packs, accum, world in ((4, 1, 1), (1, 4, 1), (1, 2, 2)):
        layout = StepLayout(len(table), batch_packs=batch_packs, accum=accum, world=world)
        model.zero_grad()
        wce = 0.0
        for rank in range(world):  # ranks one after the other; DDP would average their grads
            ds = PackBatches(
                table,
                layout,
                rank=rank,
                end_step=1,
                image_size=448,
                tokens_per_tile=256,
                image_token_id=token_ids.img_context,
            )
            for batch in ds:
                wce += micro_step(module, batch, torch.device("cpu"), world)
        loss = wce / float(batch["weight_sum"])
        grads = torch.cat([p.grad.flatten() / world for p in model.parameters()])
        results.append((loss, grads))
    (ref_loss, ref_grads), *others = results
    for loss, grads in others:
        assert loss == pytest.approx(ref_loss, rel=1e-6)
        assert float((grads - ref_grads).norm() / ref_grads.norm()) <= 1e-5
