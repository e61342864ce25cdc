"""Training throughput: packed sequences vs the same samples in padded batches.

    python bench/train.py --profile realistic --max-tokens 16384 --max-tiles 48 --packs 3
    python bench/train.py --profile text --max-tokens 8192 --max-tiles 40 --packs 4 --mask-variant
    python bench/train.py --flavor 1b --bf16 --max-tokens 16384 --max-tiles 48 --packs 8  # GPU

Samples have InternVL 2.5 SFT-like lengths
(``curate.stages.pack.internvl_packer.synthetic_mixture``: text, single image 1-12 tiles +
thumbnail, multi-image, video frames), those over the caps are dropped, and
``curate.stages.pack.binpack.pack_lengths`` packs them into PACK_SCHEMA manifests. The timed packs
go through the trainer's own path (``PackBatches`` → ``PackedCausalLM`` with the trainer's
attention: flash-attn varlen on GPU, per-sample SDPA on CPU; also the block-mask SDPA variant with
``--mask-variant``). Two padded baselines, B = mean samples per pack, each batch padded to its
longest sample with a 2-D padding mask (the usual non-packed SFT batch):

- ``padded``: exactly the samples of the timed packs, in their original (shuffled) order;
- ``padded, length-grouped``: the same samples in HF Trainer's ``group_by_length`` order, from
  its own ``get_length_grouped_indices`` with one mega-batch holding them all (sorted by
  length, then cut into batches: the tightest grouping it reaches; on a whole dataset it sorts
  mega-batches of 50·B random samples).

All sides run forward, backward and an AdamW step on the same model, same weights, same loss
weights, and count only real tokens. Timed in wall seconds and in CPU seconds of this process
(the dev machine is shared, so wall time swings with its load); the ratios are packed / padded
tokens per second."""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F


def build_samples(args, tokenizer, workdir: Path):
    from curate.stages.pack import internvl_packer as ip
    from curate.stages.pack.binpack import pack_lengths
    from curate.stages.train.synthetic import TokenIds, samples_from_lengths, write_image

    profile = {
        "realistic": ip.REALISTIC,
        "image_heavy": ip.IMAGE_HEAVY,
        "text": ip.MixtureProfile(text=1.0, single=0.0, multi=0.0, video=0.0),
    }
    tokens, tiles = ip.synthetic_mixture(
        args.samples, seed=args.seed, profile=profile[args.profile]
    )
    keep = (tokens <= args.max_tokens) & (tiles <= args.max_tiles)
    tokens, tiles = tokens[keep], tiles[keep]
    rng = np.random.default_rng(args.seed)
    images = [
        write_image(workdir / f"im{i}.jpg", rng, w, h)
        for i, (w, h) in enumerate([(640, 480), (480, 640), (800, 450), (300, 300)])
    ]
    samples = samples_from_lengths(rng, TokenIds.from_tokenizer(tokenizer), tokens, tiles, images)
    packs = pack_lengths(
        tokens, tiles, max_tokens=args.max_tokens, max_tiles=args.max_tiles, seed=args.seed
    )
    return samples, packs, int(keep.sum()), len(keep)


def padded_batches(groups: list[list], image_batches: list[torch.Tensor], pad_id: int):
    """Padded (input_ids, attention_mask, targets, weights, pixel_values) per batch of samples."""
    from curate.core.chat import IGNORE_INDEX
    from curate.stages.train.data import loss_weight

    out = []
    for b, group in enumerate(groups):
        width = max(len(s.input_ids) for s in group)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        targets = torch.full((len(group), width), IGNORE_INDEX, dtype=torch.long)
        weights = torch.zeros((len(group), width))
        for r, s in enumerate(group):
            n = len(s.input_ids)
            ids[r, :n] = torch.tensor(s.input_ids)
            mask[r, :n] = 1
            targets[r, : n - 1] = torch.tensor(s.labels[1:])
            weights[r, :n] = float(loss_weight(s.supervised, "square"))
        weights[targets == IGNORE_INDEX] = 0
        out.append(
            {
                "input_ids": ids,
                "attention_mask": mask,
                "targets": targets,
                "weights": weights,
                "pixel_values": image_batches[b],
                "real_tokens": int(mask.sum()),
                "tiles": int(image_batches[b].shape[0]),
            }
        )
    return out


def length_grouped(samples, batch_size: int, seed: int) -> list[list[int]]:
    """Batches (indices into ``samples``) in HF Trainer's ``group_by_length`` order, with one
    mega-batch holding every sample: all sorted by length, the tightest grouping it reaches."""
    from transformers.trainer_pt_utils import get_length_grouped_indices

    lengths = [len(s.input_ids) for s in samples]
    order = get_length_grouped_indices(
        lengths,
        batch_size,
        mega_batch_mult=-(-len(samples) // batch_size),
        generator=torch.Generator().manual_seed(seed),
    )
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def padded_loss(model, batch, device):
    """Σ w·CE of one padded batch (the same loss as the packed side)."""
    inner = model.model
    pix = batch["pixel_values"].to(device)
    if pix.shape[0] == 0:  # the same blank-tile rule as the packed side
        vision = inner.get_image_features(
            pixel_values=torch.zeros(1, 3, 448, 448, device=device), return_dict=True
        )
    else:
        vision = inner.get_image_features(pixel_values=pix, return_dict=True)
    from curate.stages.train.loss import embed_with_images

    ids = batch["input_ids"].to(device)
    # Image features merged as the packed side does (transformers 5.17 has no
    # mm_encoder_outputs: it would train without the images).
    out = inner.language_model(
        inputs_embeds=embed_with_images(inner, ids, vision if pix.shape[0] else None),
        attention_mask=batch["attention_mask"].to(device),
        use_cache=False,
    )
    targets, weights = batch["targets"].to(device), batch["weights"].to(device)
    keep = targets != -100
    ce = F.cross_entropy(
        model.lm_head(out.last_hidden_state[keep]).float(), targets[keep], reduction="none"
    )
    total = (ce * weights[keep]).sum()
    if pix.shape[0] == 0:
        total = total + 0.0 * vision.pooler_output.sum()
    return total


def timed(run_one, batches, optimizer, device, warmup: int, repeat: int) -> tuple[float, float]:
    """Best of ``repeat``: (wall s, process CPU s) of forward+backward+AdamW over ``batches``."""
    for batch in batches[:warmup]:
        run_one(batch).backward()
        optimizer.zero_grad(set_to_none=True)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = (float("inf"), float("inf"))
    for _ in range(repeat):
        sync()
        wall, cpu = time.perf_counter(), time.process_time()
        for batch in batches:
            run_one(batch).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        sync()
        best = (min(best[0], time.perf_counter() - wall), min(best[1], time.process_time() - cpu))
    return best


def main() -> None:
    from transformers import AutoTokenizer

    from curate.demo.models import build_tokenizer
    from curate.stages.train import model as m
    from curate.stages.train.data import PackBatches, StepLayout
    from curate.stages.train.loss import PackedCausalLM
    from curate.stages.train.synthetic import write_packs

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--flavor", default="debug", choices=sorted(m.FLAVORS))
    p.add_argument("--samples", type=int, default=600, help="synthetic samples drawn")
    p.add_argument("--max-tokens", type=int, default=4096, help="C: tokens per pack")
    p.add_argument("--max-tiles", type=int, default=16, help="K: tiles per pack")
    p.add_argument("--packs", type=int, default=6, help="packs timed (and their samples)")
    p.add_argument(
        "--profile",
        default="realistic",
        choices=["realistic", "image_heavy", "text"],
        help="sample length mixture (curate.stages.pack.internvl_packer profiles)",
    )
    p.add_argument("--warmup", type=int, default=1, help="untimed batches first")
    p.add_argument("--repeat", type=int, default=2, help="timed passes; the best is kept")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attention", default="auto", help="packed side: auto|flash|varlen|sdpa")
    p.add_argument(
        "--mask-variant",
        action="store_true",
        help="also time the packed side with one block-diagonal SDPA mask",
    )
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    tokenizer = AutoTokenizer.from_pretrained(build_tokenizer(work / "tok"))
    samples, packs, kept, drawn = build_samples(args, tokenizer, work)
    packs = packs[: args.packs]
    write_packs([[samples[i] for i in pack] for pack in packs], work / "packs")
    from curate.stages.train.data import read_packs

    table = read_packs(work / "packs")
    torch.manual_seed(args.seed)
    if args.flavor == "debug":
        model = m.build_model("debug", tokenizer)
    else:  # the flavor's real vocabulary size (the tokenizer only names special ids)
        from transformers import InternVLForConditionalGeneration

        model = InternVLForConditionalGeneration(
            m.internvl_config(
                args.flavor, vocab_size=None, image_token_id=m.image_token_id(tokenizer)
            )
        )
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ctx = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

    ds = PackBatches(
        table,
        StepLayout(len(table)),
        end_step=len(table),
        image_size=448,
        tokens_per_tile=256,
        image_token_id=model.config.image_token_id,
        augment=False,
    )
    packed = [ds[i] for i in range(len(ds))]
    keys = ("input_ids", "position_ids", "targets", "weights", "seq_lens", "pixel_values")

    def packed_run(attention):
        impl = m.resolve_attention(attention)
        model.set_attn_implementation(impl)
        module = PackedCausalLM(model, impl)

        def one(batch):
            with ctx:
                return module(**{k: batch[k].to(device) for k in keys}) / batch["weight_sum"]

        return impl, timed(one, packed, optimizer, device, args.warmup, args.repeat)

    # Padded side: the packs' samples in their original order, B = mean samples per pack.
    order = sorted(i for pack in packs for i in pack)
    chosen = [samples[i] for i in order]
    batch_size = max(1, round(len(chosen) / len(packs)))
    tiles_by_sample = {}  # the exact tiles of every sample, cut out of its pack's batch
    for pack, batch in zip(packs, packed, strict=True):
        offset = 0
        for i in pack:
            n = samples[i].tiles
            tiles_by_sample[i] = batch["pixel_values"][offset : offset + n]
            offset += n
    image_batches = [
        torch.cat([tiles_by_sample[i] for i in order[s : s + batch_size]])
        for s in range(0, len(order), batch_size)
    ]
    groups = [chosen[s : s + batch_size] for s in range(0, len(chosen), batch_size)]
    padded = padded_batches(groups, image_batches, tokenizer.pad_token_id)
    grouped_ids = length_grouped(chosen, batch_size, args.seed)
    grouped = padded_batches(
        [[chosen[i] for i in g] for g in grouped_ids],
        [torch.cat([tiles_by_sample[order[i]] for i in g]) for g in grouped_ids],
        tokenizer.pad_token_id,
    )

    rows = []
    impl, (wall, cpu) = packed_run(args.attention)
    real = sum(b["n_tokens"] for b in packed)
    tiles = sum(b["n_tiles"] for b in packed)
    rows.append((f"packed ({impl})", len(packed), real, real, tiles, wall, cpu))
    if args.mask_variant:
        impl, (wall, cpu) = packed_run("sdpa")
        rows.append((f"packed ({impl} block mask)", len(packed), real, real, tiles, wall, cpu))
    # Padded side: SDPA with the padding mask, or flash-attn (which unpads inside attention).
    flash = m.resolve_attention("auto") == "flash_attention_2"
    model.set_attn_implementation("flash_attention_2" if flash else "sdpa")

    def padded_one(batch):
        with ctx:
            total = padded_loss(model, batch, device)
        return total / max(1e-9, float(batch["weights"].sum()))

    for name, batches in (("padded", padded), ("padded, length-grouped", grouped)):
        wall, cpu = timed(padded_one, batches, optimizer, device, args.warmup, args.repeat)
        rows.append(
            (
                f"{name} (B={batch_size}, {model.config._attn_implementation})",
                len(batches),
                sum(b["real_tokens"] for b in batches),
                sum(b["input_ids"].numel() for b in batches),
                sum(b["tiles"] for b in batches),
                wall,
                cpu,
            )
        )

    print(
        f"device: {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else ''}"
        f"{torch.get_num_threads()} threads), flavor {args.flavor}, {args.profile} mixture, "
        f"caps C={args.max_tokens}"
        f" K={args.max_tiles}; {kept}/{drawn} drawn samples within the caps; timed: "
        f"{len(chosen)} samples, {real:,} tokens, {tiles} tiles in {len(packed)} packs"
    )
    print(
        f"{'side':44s} {'batches':>7s} {'tokens':>8s} {'slots':>8s} {'tiles':>5s} "
        f"{'wall s':>7s} {'cpu s':>7s} {'tok/s wall':>10s} {'tok/s cpu':>10s}"
    )
    for name, n, tok, slot, til, w, c in rows:
        print(
            f"{name:44s} {n:7d} {tok:8,d} {slot:8,d} {til:5d} {w:7.2f} {c:7.2f} "
            f"{tok / w:10,.0f} {tok / c:10,.0f}"
        )
    packed_tok, pw, pc = rows[0][2], rows[0][5], rows[0][6]
    for name, _, tok, slot, _, w, c in rows[-2:]:
        print(
            f"{name}: padding {1 - tok / slot:.1%} of slots; packed/padded tokens/s: "
            f"{(packed_tok / pw) / (tok / w):.2f}x (wall), "
            f"{(packed_tok / pc) / (tok / c):.2f}x (CPU time)"
        )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
