"""GPU check of the training path: packed attention, bf16, throughput, memory, one table.

    PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --json $OUT/gpu_check.json  # one H200
    python bench/gpu_check.py --cpu-smoke                   # the same code, CPU, tiny sizes

Made for a GPU lent for minutes to a bare machine (torch, transformers, numpy, pyarrow, pillow,
xxhash, typer, rich; no vLLM, polars, pydantic, orjson, datasets): it reads curate from this
checkout (no install) and imports only ``curate.stages.train.{model,loss,loop}``,
``curate.stages.pack.{internvl_packer,binpack}`` and ``curate.core.{chat,errors}``
(tests/stages/train/test_gpu_check.py runs the smoke run and checks that list). No download:
the ``1b`` flavor (InternVL2.5-1B shapes, 938M parameters) gets random weights, samples get
InternVL 2.5 token ids and random pixels, and packs come from the pack stage's synthetic
InternVL-like mixture packed at 16384 tokens / 48 tiles.

What it measures, most important first (a time budget skips the rest, never the table):

1. bf16 packed == per-sample: the loss (Σ w·CE) of a whole pack against the sum over its
   samples run alone, on the 1b flavor under bf16 autocast, per attention path (max relative
   difference over the packs; goal ≤ 1e-2), and the gradients.
2. Training throughput, packed, 1b, bf16, attention ``auto``: tokens/s, tiles/s, model FLOPs
   utilisation against the 790 TFLOP/s bf16 matmul rate measured on this kind of machine (and
   against the rate measured at the start), peak memory. Every timed row first runs its
   packs once untimed (compilation: every length seen once), and says how many graphs were
   compiled in the timed pass (0 unless lengths recompile).
3. Packed against padded batches of the same samples on the same model: B = mean samples per
   pack, each batch padded to its longest sample, shuffled and length-grouped (HF Trainer's
   ``group_by_length``), with gradient checkpointing on every side (padded batches of 16k-token
   samples do not fit otherwise); goal packed ≥ 1.5x length-grouped.
4. fp32 packed == per-sample on the debug flavor for every path (flash only in bf16), TF32
   off (goal ≤ 1e-5).
5. Other paths' throughput: flex with a static length per 2048-token bucket (in case the
   dynamic-length flex kernel recompiles or fails), and the per-sample SDPA loop.

FLOPs count the model only (no recomputation): per pack 3 × forward, forward = 2 · LLM
non-embedding parameters · tokens + 2 · layers · width · Σ len² (causal) + per tile
2 · ViT parameters · 1025 + 4 · layers · width · 1025² + projector + lm_head at supervised
tokens. A row that fails (out of memory, a kernel that does not compile) says so and the rest
still runs.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's curate
# Packs and padded batches of many sizes: let the allocator grow segments, not fragment.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from curate.core.chat import IGNORE_INDEX  # noqa: E402
from curate.stages.pack.binpack import pack_lengths  # noqa: E402
from curate.stages.pack.internvl_packer import REALISTIC, synthetic_mixture  # noqa: E402
from curate.stages.train import model as m  # noqa: E402
from curate.stages.train.loop import micro_step, param_groups  # noqa: E402
from curate.stages.train.loss import (  # noqa: E402
    FlexMode,
    PackedCausalLM,
    embed_with_images,
    register_flex,
)

# InternVL 2.5's token ids (Qwen2.5 vocabulary + InternVL's added tokens): no tokenizer needed.
IM_START, IM_END, IMG_START, IMG_END, IMG_CONTEXT = 151644, 151645, 151665, 151666, 151667
PAD = 151643  # <|endoftext|>
TEXT_IDS = (0, 151643)  # plain tokens are drawn from this range
TOKENS_PER_TILE = 256
VIT_TOKENS_PER_TILE = 1025
H200_BF16_FLOPS = 790e12  # 8192³ bf16 matmul through PyTorch on this kind of machine


@dataclass(frozen=True)
class Sizes:
    flavor: str = "1b"
    max_tokens: int = 16384
    max_tiles: int = 48
    samples: int = 150  # drawn from the mixture before packing
    timed_packs: int = 6  # each timed row runs them once untimed (compilation), then timed
    check_packs: int = 2  # packs checked packed vs per-sample (those nearest 5 samples)
    budget_s: float = 360.0  # sections that would start after this are skipped
    matmul_n: int = 8192
    flex_bucket: int = 2048


SMOKE = Sizes(
    flavor="debug",
    max_tokens=2048,
    max_tiles=4,
    samples=80,
    timed_packs=2,
    check_packs=1,
    budget_s=600.0,
    matmul_n=512,
    flex_bucket=1024,
)


@dataclass
class Sample:
    ids: np.ndarray
    labels: np.ndarray
    tiles: int
    seed: int  # its index in the mixture; its pixels: the same tensor packed and alone

    @property
    def supervised(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


@dataclass
class Row:
    section: str
    setting: str
    value: str
    goal: str = ""
    ok: bool | None = None
    data: dict = field(default_factory=dict)


class Report:
    def __init__(self, sizes: Sizes):
        self.t0 = time.perf_counter()
        self.sizes = sizes
        self.rows: list[Row] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def add(self, row: Row) -> None:
        self.rows.append(row)
        mark = {True: "ok", False: "MISSED", None: ""}[row.ok]
        print(f"[{self.elapsed():6.1f}s] {row.section} | {row.setting} | {row.value} {mark}")
        sys.stdout.flush()

    def run(self, section: str, setting: str, fn: Callable[[], Row | list[Row]]) -> None:
        """One measurement: skipped past the budget, an error becomes its row."""
        if self.elapsed() > self.sizes.budget_s:
            self.add(Row(section, setting, "skipped: time budget spent"))
            return
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001 - any failure is a finding of the check
            traceback.print_exc()
            oom = isinstance(e, torch.OutOfMemoryError)
            text = "out of memory" if oom else f"{type(e).__name__}: {' '.join(str(e).split())}"
            self.add(Row(section, setting, f"FAILED {text[:160]}", ok=False))
        else:
            for row in out if isinstance(out, list) else [out]:
                self.add(row)
        finally:
            free_memory()

    def table(self) -> str:
        heads = ("section", "setting", "value", "goal", "")
        cells = [
            (r.section, r.setting, r.value, r.goal, {True: "ok", False: "MISSED"}.get(r.ok, ""))
            for r in self.rows
        ]
        widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
        line = "| " + " | ".join(h.ljust(w) for h, w in zip(heads, widths, strict=True)) + " |"
        sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
        body = [
            "| " + " | ".join(c.ljust(w) for c, w in zip(cell, widths, strict=True)) + " |"
            for cell in cells
        ]
        return "\n".join([line, sep, *body])


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# --- data ----------------------------------------------------------------------------------


def make_samples(sizes: Sizes, seed: int = 0) -> tuple[list[Sample], list[list[int]]]:
    """Samples of the InternVL-like mixture within the caps, and their packs (pack stage)."""
    tokens, tiles = synthetic_mixture(sizes.samples, seed=seed, profile=REALISTIC)
    rng = np.random.default_rng(seed)
    samples = []
    for i, (n_tok, n_til) in enumerate(zip(tokens.tolist(), tiles.tolist(), strict=True)):
        visual = n_til * TOKENS_PER_TILE + 2 if n_til else 0
        text = max(4, n_tok - visual)
        answer = max(1, int(0.4 * text))
        prompt = max(0, text - answer - 2)
        image = [IMG_START, *[IMG_CONTEXT] * (n_til * TOKENS_PER_TILE), IMG_END] if n_til else []
        head = [IM_START, *rng.integers(*TEXT_IDS, prompt).tolist(), *image]
        tail = [*rng.integers(*TEXT_IDS, answer).tolist(), IM_END]
        ids = np.array(head + tail, dtype=np.int64)
        labels = np.array([IGNORE_INDEX] * len(head) + tail, dtype=np.int64)
        samples.append(Sample(ids, labels, int(n_til), seed=i))
    keep = [
        i
        for i, s in enumerate(samples)
        if len(s.ids) <= sizes.max_tokens and s.tiles <= sizes.max_tiles
    ]
    samples = [samples[i] for i in keep]
    packs = pack_lengths(
        [len(s.ids) for s in samples],
        [s.tiles for s in samples],
        max_tokens=sizes.max_tokens,
        max_tiles=sizes.max_tiles,
        seed=seed,
    )
    return samples, packs


def pixels_of(sample: Sample, image_size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(sample.seed)
    return torch.randn((sample.tiles, 3, image_size, image_size), generator=g)


def packed_batch(samples: list[Sample], image_size: int, device: torch.device) -> dict:
    """The trainer's micro-batch of one pack (``data.PackBatches``' keys; weights 1/√x)."""
    ids = np.concatenate([s.ids for s in samples])
    targets, weights, positions = [], [], []
    for s in samples:
        t = np.full_like(s.labels, IGNORE_INDEX)
        t[:-1] = s.labels[1:]
        targets.append(t)
        weights.append(np.where(t != IGNORE_INDEX, 1.0 / np.sqrt(max(1, s.supervised)), 0.0))
        positions.append(np.arange(len(s.ids)))
    weight = np.concatenate(weights)
    return {
        "input_ids": torch.from_numpy(ids).to(device),
        "position_ids": torch.from_numpy(np.concatenate(positions)).to(device),
        "targets": torch.from_numpy(np.concatenate(targets)).to(device),
        "weights": torch.from_numpy(weight.astype(np.float32)).to(device),
        "seq_lens": torch.tensor([len(s.ids) for s in samples], dtype=torch.int32),
        "pixel_values": torch.cat(
            [pixels_of(s, image_size) for s in samples]
            or [torch.zeros(0, 3, image_size, image_size)]
        ).to(device),
        "weight_sum": torch.tensor(float(weight.sum()), dtype=torch.float64),
        "n_tokens": int(ids.size),
        "n_tiles": sum(s.tiles for s in samples),
        "supervised": sum(s.supervised for s in samples),
        "sum_len2": float(sum(len(s.ids) ** 2 for s in samples)),
    }


def padded_batch(samples: list[Sample], image_size: int, device: torch.device) -> dict:
    """The usual non-packed SFT batch: rows padded to the longest sample, a 2-D padding mask."""
    width = max(len(s.ids) for s in samples)
    shape = (len(samples), width)
    ids = torch.full(shape, PAD, dtype=torch.long)
    mask = torch.zeros(shape, dtype=torch.long)
    targets = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    weights = torch.zeros(shape)
    for r, s in enumerate(samples):
        n = len(s.ids)
        ids[r, :n], mask[r, :n] = torch.from_numpy(s.ids), 1
        targets[r, : n - 1] = torch.from_numpy(s.labels[1:])
        weights[r, :n] = 1.0 / float(np.sqrt(max(1, s.supervised)))
    weights[targets == IGNORE_INDEX] = 0
    return {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "targets": targets.to(device),
        "weights": weights.to(device),
        "pixel_values": torch.cat(
            [pixels_of(s, image_size) for s in samples]
            or [torch.zeros(0, 3, image_size, image_size)]
        ).to(device),
        "n_tokens": int(mask.sum()),
        "slots": int(mask.numel()),
        "n_tiles": sum(s.tiles for s in samples),
    }


def length_grouped(samples: list[Sample], batch_size: int) -> list[list[int]]:
    """HF Trainer's ``group_by_length`` order, one mega-batch holding every sample."""
    from transformers.trainer_pt_utils import get_length_grouped_indices

    order = get_length_grouped_indices(
        [len(s.ids) for s in samples],
        batch_size,
        mega_batch_mult=-(-len(samples) // batch_size),
        generator=torch.Generator().manual_seed(0),
    )
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


# --- model and FLOPs -----------------------------------------------------------------------


def build(flavor: str, device: torch.device):
    """The flavor with random weights, made on the device (fp32 master weights)."""
    from transformers import InternVLForConditionalGeneration

    config = m.internvl_config(flavor, vocab_size=None, image_token_id=IMG_CONTEXT)
    torch.manual_seed(0)
    with torch.device(device):
        model = InternVLForConditionalGeneration(config)
    model.config.use_cache = False
    return model.train()


@dataclass(frozen=True)
class FlopModel:
    llm: float  # LLM non-embedding parameters
    llm_layers: int
    llm_width: int
    vit: float
    vit_layers: int
    vit_width: int
    projector: float
    lm_head: float

    @classmethod
    def of(cls, model) -> FlopModel:
        inner = model.model

        def count(module) -> float:
            return float(sum(p.numel() for p in module.parameters()))

        lm = inner.language_model
        tc, vc = model.config.text_config, model.config.vision_config
        return cls(
            llm=count(lm) - count(lm.embed_tokens),
            llm_layers=tc.num_hidden_layers,
            llm_width=tc.hidden_size,
            vit=count(inner.vision_tower),
            vit_layers=vc.num_hidden_layers,
            vit_width=vc.hidden_size,
            projector=count(inner.multi_modal_projector),
            lm_head=float(model.lm_head.weight.numel()),
        )

    def train_flops(self, batch: dict) -> float:
        """Training FLOPs (3 × forward) of one packed batch, recomputation not counted."""
        llm = (
            2 * self.llm * batch["n_tokens"]
            + 2 * self.llm_layers * self.llm_width * batch["sum_len2"]
        )
        per_tile = (
            2 * self.vit * VIT_TOKENS_PER_TILE
            + 4 * self.vit_layers * self.vit_width * VIT_TOKENS_PER_TILE**2
            + 2 * self.projector * TOKENS_PER_TILE
        )
        head = 2 * self.lm_head * batch["supervised"]
        return 3 * (llm + per_tile * batch["n_tiles"] + head)


def matmul_rate(device: torch.device, n: int) -> float:
    """bf16 FLOP/s of an n³ matrix product (mean of 10 after 3 warm-ups)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    return 10 * 2 * n**3 / (time.perf_counter() - t)


# --- the checks ----------------------------------------------------------------------------


def use_attention(model, requested: str, device: torch.device, mode: FlexMode | None = None):
    """Set the model's packed attention; returns (impl, the path line the trainer prints)."""
    choice = m.attention_choice(requested, device, backward=device.type == "cuda")
    if choice.impl == "flex_varlen":
        register_flex(mode or (FlexMode() if device.type == "cuda" else FlexMode(compiled=False)))
    model.set_attn_implementation(choice.impl)
    return choice.impl, choice.line()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def packed_vs_single(
    model, impl: str, packs: list[list[Sample]], device, *, bf16: bool, grads: bool
) -> dict:
    """Max over packs of the relative difference, packed against the sum of its samples
    alone: the loss (Σ w·CE) and, with ``grads``, the whole gradient."""
    module = PackedCausalLM(model, impl)
    size = m.image_size(model.config)
    keys = ("input_ids", "position_ids", "targets", "weights", "seq_lens", "pixel_values")

    def run(samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch = packed_batch(samples, size, device)
        model.zero_grad(set_to_none=True)
        with (
            torch.set_grad_enabled(grads),
            torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16),
        ):
            wce = module(**{k: batch[k] for k in keys}).float()
        if not grads:
            return wce.detach(), None
        wce.backward()
        flat = torch.cat([p.grad.flatten().float() for p in model.parameters()])
        return wce.detach(), flat

    loss_rel, grad_rel = 0.0, 0.0
    for pack in packs:
        loss, grad = run(pack)
        ref_loss, ref_grad = torch.zeros((), device=device), None
        for s in pack:
            one, g = run([s])
            ref_loss += one
            if g is not None:
                ref_grad = g if ref_grad is None else ref_grad.add_(g)
        loss_rel = max(loss_rel, _rel(loss, ref_loss))
        if grads:
            grad_rel = max(grad_rel, _rel(grad, ref_grad))
        del grad, ref_grad
    model.zero_grad(set_to_none=True)
    return {"loss_rel": loss_rel, "grad_rel": grad_rel if grads else None}


def equality_row(section, model, requested, packs, device, *, bf16, goal, mode=None) -> Row:
    impl, line = use_attention(model, requested, device, mode)
    grads = device.type == "cuda" or impl != "flex_varlen"  # no flex backward on a CPU
    got = packed_vs_single(model, impl, packs, device, bf16=bf16, grads=grads)
    # The goal holds the loss; in bf16 the gradients are reported (rounding differs per run).
    worst = got["loss_rel"] if bf16 or not grads else max(got["loss_rel"], got["grad_rel"])
    text = f"loss {got['loss_rel']:.2e}" + (
        f", grads {got['grad_rel']:.2e}" if got["grad_rel"] is not None else ", forward only"
    )
    setting = f"{requested}{'' if mode is None else f' {_mode_name(mode)}'} -> {impl}"
    return Row(section, setting, text, f"<= {goal:g}", worst <= goal, {**got, "path": line})


def _mode_name(mode: FlexMode) -> str:
    if not mode.compiled:
        return "eager"
    return "dynamic" if mode.dynamic else f"buckets of {mode.bucket_tokens}"


def compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def time_training(model, step: Callable[[dict], None], batches: list[dict], device) -> dict:
    """One untimed pass over the batches (compilation, every length seen once), then the timed
    pass; peak memory and the graphs compiled in the timed pass (0 unless lengths recompile)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t = time.perf_counter()
    for b in batches:
        step(b)
    sync(device)
    warm = time.perf_counter() - t
    graphs = compiled_graphs()
    t = time.perf_counter()
    for b in batches:
        step(b)
    sync(device)
    seconds = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {
        "seconds": seconds,
        "warm_pass_s": warm,
        "peak_gib": peak,
        "recompiled": compiled_graphs() - graphs,
    }


def trainer_step(model, impl: str, device, bf16: bool):
    """The trainer's step: ``loop.micro_step`` (bf16 autocast, fp32 loss and Σw), clipping,
    AdamW over fp32 master weights."""
    module = PackedCausalLM(model, impl)
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-5)
    params = [p for p in model.parameters() if p.requires_grad]

    def step(batch: dict) -> None:
        micro_step(module, batch, device, 1, bf16)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def padded_step(model, device, bf16: bool):
    """Forward + backward + AdamW of one padded batch (the same loss as the packed side)."""
    from torch.nn import functional as F

    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-5)
    inner = model.model

    def step(batch: dict) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            pix = batch["pixel_values"]
            blank = pix.shape[0] == 0
            if blank:
                pix = torch.zeros((1, *pix.shape[1:]), device=device)
            vision = inner.get_image_features(pixel_values=pix, return_dict=True)
            out = inner.language_model(
                inputs_embeds=embed_with_images(
                    inner, batch["input_ids"], None if blank else vision
                ),
                attention_mask=batch["attention_mask"],
                use_cache=False,
            )
            keep = batch["targets"] != IGNORE_INDEX
            logits = model.lm_head(out.last_hidden_state[keep]).float()
        ce = F.cross_entropy(logits, batch["targets"][keep], reduction="none")
        total = (ce * batch["weights"][keep]).sum() + 0.0 * vision.pooler_output.float().sum()
        (total / batch["weights"].sum()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def throughput_row(
    section: str,
    setting: str,
    model,
    flops: FlopModel,
    batches: list[dict],
    step,
    device,
    peak_flops: float,
    measured_flops: float,
    goal_mfu: float | None,
) -> Row:
    got = time_training(model, step, batches, device)
    timed = batches
    tokens = sum(b["n_tokens"] for b in timed)
    tiles = sum(b["n_tiles"] for b in timed)
    seconds = got["seconds"]
    data = {**got, "tokens": tokens, "tiles": tiles, "tokens_s": tokens / seconds}
    data["tiles_s"] = tiles / seconds
    text = f"{tokens / seconds:,.0f} tok/s, {tiles / seconds:,.1f} tiles/s"
    if "sum_len2" in timed[0]:  # packed: model FLOPs utilisation
        fl = sum(flops.train_flops(b) for b in timed)
        data["mfu"], data["mfu_measured"] = fl / seconds / peak_flops, fl / seconds / measured_flops
        text += f", MFU {data['mfu']:.1%} ({data['mfu_measured']:.1%} of measured)"
    else:
        pad = 1 - tokens / sum(b["slots"] for b in timed)
        data["padding"] = pad
        text += f", padding {pad:.1%}"
    text += f", untimed first pass {got['warm_pass_s']:.1f} s"
    if got["recompiled"]:
        text += f", {got['recompiled']} graphs compiled while timed"
    if device.type == "cuda":
        text += f", peak {got['peak_gib']:.1f} GiB"
    ok = None if goal_mfu is None else data["mfu"] >= goal_mfu
    goal = "" if goal_mfu is None else f"MFU >= {goal_mfu:.0%}"
    return Row(section, setting, text, goal, ok, data)


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, Sizes]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--cpu-smoke",
        "--smoke",
        action="store_true",
        help="the same code on the CPU: debug flavor, tiny packs (a test runs this)",
    )
    p.add_argument("--json", type=Path, help="also write the rows here")
    p.add_argument("--budget-s", type=float, help="skip sections that would start later")
    p.add_argument("--flavor", choices=sorted(m.FLAVORS), help="model size (default 1b)")
    args = p.parse_args(argv)
    sizes = asdict(SMOKE if args.cpu_smoke else Sizes())
    if args.budget_s is not None:
        sizes["budget_s"] = args.budget_s
    if args.flavor is not None:
        sizes["flavor"] = args.flavor
    return args, Sizes(**sizes)


def check_packs(packs: list[list[Sample]], n: int) -> list[list[Sample]]:
    """The ``n`` packs nearest 5 samples (several samples, few runs alone)."""
    several = [p for p in packs if len(p) >= 2] or packs
    return sorted(several, key=lambda p: abs(len(p) - 5))[:n]


def distinct_paths(requested: list[str], device: torch.device) -> list[str]:
    """The requested paths that run here, one per implementation (auto is one of them)."""
    seen, out = set(), []
    for r in requested:
        try:
            impl = m.attention_choice(r, device, backward=False).impl
        except m.AttentionUnavailable:
            continue
        if impl not in seen:
            seen.add(impl)
            out.append(r)
    return out


def main(argv: list[str] | None = None) -> Report:
    args, sizes = parse(argv)
    if args.cpu_smoke:  # eager flex says so at every shape; the smoke run uses it on purpose
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile")
    device = torch.device("cpu" if args.cpu_smoke or not torch.cuda.is_available() else "cuda")
    gpu = device.type == "cuda"
    report = Report(sizes)
    import transformers

    name = torch.cuda.get_device_name() if gpu else f"CPU, {torch.get_num_threads()} threads"
    flash = m.flash_attn_installed()
    report.add(
        Row(
            "machine",
            name,
            f"torch {torch.__version__}, transformers {transformers.__version__}, "
            f"flash-attn {'installed' if flash else 'not installed'}",
        )
    )
    measured = matmul_rate(device, sizes.matmul_n)
    peak = H200_BF16_FLOPS if gpu else measured
    report.add(Row("machine", f"bf16 matmul {sizes.matmul_n}³", f"{measured / 1e12:.1f} TFLOP/s"))

    samples, index = make_samples(sizes)
    packs = [[samples[i] for i in p] for p in index]
    timed, check = packs[: sizes.timed_packs], check_packs(packs[sizes.timed_packs :], 2)
    check = check[: sizes.check_packs] or check_packs(timed, sizes.check_packs)
    report.add(
        Row(
            "data",
            f"C={sizes.max_tokens} K={sizes.max_tiles}: {len(samples)} samples, {len(packs)} packs",
            f"timed {len(timed)} packs: {sum(len(p) for p in timed)} samples, "
            f"{sum(len(s.ids) for p in timed for s in p):,} tokens, "
            f"{sum(s.tiles for p in timed for s in p)} tiles; checked {len(check)} packs of "
            f"{', '.join(str(len(p)) for p in check)} samples",
        )
    )

    model = build(sizes.flavor, device)
    flops = FlopModel.of(model)
    image_size = m.image_size(model.config)
    paths = distinct_paths(["auto", "flash", "flex", "varlen", "sdpa"], device)

    # 1. bf16 packed == per-sample on the flavor, every path.
    bf16_check = f"packed == per-sample, bf16, {sizes.flavor}"
    for requested in paths:
        report.run(
            bf16_check,
            requested,
            lambda r=requested: equality_row(
                bf16_check, model, r, check, device, bf16=True, goal=1e-2
            ),
        )

    # 2. Training throughput, packed, attention auto (what the trainer picks here).
    batches = [packed_batch(p, image_size, device) for p in timed]
    train = f"train, packed, bf16, {sizes.flavor}"

    def packed_rate(requested, *, ckpt: bool, section: str, mode=None, goal=None):
        def run() -> Row:
            impl, line = use_attention(model, requested, device, mode)
            if not gpu and impl == "flex_varlen":
                raise RuntimeError("no flex backward on the CPU")
            set_checkpointing(model, ckpt)
            step = trainer_step(model, impl, device, bf16=True)
            setting = f"{requested}{'' if mode is None else f' {_mode_name(mode)}'} -> {impl}"
            setting += ", checkpointing" if ckpt else ""
            row = throughput_row(
                section, setting, model, flops, batches, step, device, peak, measured, goal
            )
            row.data["path"] = line
            return row

        return run

    goal_mfu = 0.4 if gpu else None  # the goals are the H200's; the smoke run only runs
    report.run(train, "auto", packed_rate("auto", ckpt=False, section=train, goal=goal_mfu))

    # 3. Packed against padded batches of the same samples (checkpointing on every side).
    versus = f"packed vs padded, bf16, {sizes.flavor}, checkpointing"
    chosen = [s for p in timed for s in p]
    batch_size = max(1, round(len(chosen) / len(timed)))
    rates: dict[str, float] = {}

    def padded_rate(name: str, groups: list[list[Sample]]):
        def run() -> Row:
            model.set_attn_implementation("flash_attention_2" if gpu and flash else "sdpa")
            set_checkpointing(model, True)
            step = padded_step(model, device, bf16=True)
            padded = [padded_batch(g, image_size, device) for g in groups]
            setting = f"{name} (B={batch_size}, {model.config._attn_implementation})"
            row = throughput_row(
                versus, setting, model, flops, padded, step, device, peak, measured, None
            )
            rates[name] = row.data["tokens_s"]
            return row

        return run

    def packed_side() -> Row:
        row = packed_rate("auto", ckpt=True, section=versus)()
        rates["packed"] = row.data["tokens_s"]
        return row

    report.run(versus, "packed", packed_side)
    grouped = [[chosen[i] for i in g] for g in length_grouped(chosen, batch_size)]
    drawn = sorted(chosen, key=lambda x: x.seed)  # the mixture's own (shuffled) order
    shuffled = [drawn[i : i + batch_size] for i in range(0, len(drawn), batch_size)]
    report.run(versus, "padded, length-grouped", padded_rate("length-grouped", grouped))
    report.run(versus, "padded, shuffled", padded_rate("shuffled", shuffled))
    for name, goal in (("length-grouped", 1.5), ("shuffled", None)):
        if "packed" in rates and name in rates:
            ratio = rates["packed"] / rates[name]
            report.add(
                Row(
                    versus,
                    f"packed / {name} tokens/s",
                    f"{ratio:.2f}x",
                    "" if goal is None else f">= {goal}x",
                    None if goal is None or not gpu else ratio >= goal,
                    {"ratio": ratio},
                )
            )

    # 4. fp32 exactness on the debug flavor, every path that runs in fp32 (TF32 off).
    fp32_check = "packed == per-sample, fp32, debug"
    debug = model if sizes.flavor == "debug" else build("debug", device)
    small, small_index = make_samples(SMOKE, seed=1)
    few = check_packs([[small[i] for i in p] for p in small_index], 1)
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    for requested in distinct_paths(["flex", "varlen", "sdpa"], device):
        report.run(
            fp32_check,
            requested,
            lambda r=requested: equality_row(
                fp32_check, debug, r, few, device, bf16=False, goal=1e-5
            ),
        )
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32

    # 5. Other paths' throughput (GPU only: flex does not train on a CPU).
    if gpu:
        bucket = FlexMode(dynamic=False, bucket_tokens=sizes.flex_bucket)
        flex = packed_rate("flex", ckpt=False, section=train, mode=bucket)
        report.run(train, "flex buckets", flex)
        report.run(train, "varlen", packed_rate("varlen", ckpt=False, section=train))

    print()
    print(report.table())
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        rows = [asdict(r) for r in report.rows]
        args.json.write_text(json.dumps({"sizes": asdict(sizes), "rows": rows}, indent=1))
    print(f"gpu_check: {report.elapsed():.0f} s")
    return report


def set_checkpointing(model, on: bool) -> None:
    if on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


if __name__ == "__main__":
    main()
