"""The training loop: stages, AdamW + cosine, accumulation, checkpoints, resume, metrics.

Run it with ``curate train --run DIR`` (one process) or under torchrun
(``torchrun --nproc-per-node N -m -- curate.cli.train --run DIR``; the ``--`` keeps torchrun
from reading ``--run`` as its own ``--run-path``): DDP by default, FSDP2 with
``--set distributed=fsdp2``; NCCL on GPUs, gloo on CPUs.

A step's loss is ``Σ w·CE / Σ w`` over every micro-batch of every rank, with Σw known up front
from the manifest (``data.StepLayout``), so 1 rank × 2 accumulation steps and 2 ranks × 1 give
the same loss and gradients. Checkpoints are a ``save_pretrained`` directory (loadable by
transformers) plus ``trainer_state.pt`` (optimizer, scheduler, step, data layout) and one
``rng-<rank>.pt`` per rank, all plain state dicts loaded with ``weights_only=True``; resuming
replays the same data from the saved step and gives the same loss curve.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from curate.core.errors import CurateError

if TYPE_CHECKING:  # annotations only: bench/gpu_check.py imports this module without pydantic
    from curate.stages.train.config import TrainConfig


@dataclass(frozen=True)
class Stage:
    """What a training stage trains and its InternVL 2.5 defaults."""

    trains: tuple[str, ...]
    lr: float
    warmup_steps: int | None  # absolute warm-up, else warmup_ratio of the steps
    warmup_ratio: float
    drop_path: float


STAGES: dict[str, Stage] = {
    "1": Stage(("projector",), lr=2e-4, warmup_steps=100, warmup_ratio=0.0, drop_path=0.0),
    "1.5": Stage(
        ("vision", "projector"), lr=1e-5, warmup_steps=None, warmup_ratio=0.03, drop_path=0.1
    ),
    "2": Stage(
        ("vision", "projector", "llm"), lr=4e-5, warmup_steps=None, warmup_ratio=0.03, drop_path=0.1
    ),
}


@dataclass
class TrainResult:
    out: Path
    steps: int  # optimizer steps done in total (including those before a resume)
    losses: list[float] = field(default_factory=list)  # of the steps run in this call
    checkpoint: Path | None = None
    skipped: list[dict] = field(default_factory=list)  # samples left out: unreadable image


# --- small pieces ---------------------------------------------------------------------------


def warmup_steps_for(cfg: TrainConfig, stage: Stage, total_steps: int) -> int:
    if cfg.warmup_steps is not None:
        return cfg.warmup_steps
    if cfg.warmup_ratio is not None:
        return math.ceil(cfg.warmup_ratio * total_steps)
    if stage.warmup_steps is not None:
        return stage.warmup_steps
    return math.ceil(stage.warmup_ratio * total_steps)


def cosine_with_warmup(warmup: int, total: int) -> Callable[[int], float]:
    """LR multiplier: linear from 0 over ``warmup`` steps, then cosine to 0 (HF's schedule)."""

    def multiplier(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))

    return multiplier


def param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters: decay on matrices, none on biases, norms and layer scales."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            torch.distributed.all_reduce(t)
        return t.tolist()


def init_dist() -> Dist:
    """From torchrun's environment; a single process when WORLD_SIZE is unset or 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    rank = torch.distributed.get_rank() if world > 1 else 0
    return Dist(rank=rank, world=world, local_rank=local, device=device)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoints(out: Path) -> list[Path]:
    """Finished checkpoints (trainer_state.pt is written last), oldest first."""
    found = [p for p in (out / "checkpoints").glob("step-*") if (p / "trainer_state.pt").exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


BATCH_KEYS = ("input_ids", "position_ids", "targets", "weights", "seq_lens", "pixel_values")


def micro_step(
    wrapped, batch: dict, device: torch.device, world: int = 1, bf16: bool = False
) -> float:
    """Forward + backward of one micro-batch; returns its Σ w·CE.

    The backward loss is Σ w·CE · world / Σw_step: summed over the step's micro-batches and
    averaged over ranks by DDP, the gradient is that of Σ w·CE / Σ w over the whole step.
    bf16: the forward runs under bf16 autocast (matmuls and activations in bf16, the
    parameters stay fp32 master weights); Σ w·CE comes back fp32 (``PackedCausalLM`` upcasts
    the logits) and is scaled by Σw in fp64 on the host, outside autocast.
    """
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        wce = wrapped(**{k: batch[k].to(device, non_blocking=True) for k in BATCH_KEYS})
    wce = wce.float()
    (wce * (world / float(batch["weight_sum"]))).backward()
    return float(wce.detach())


def use_bf16(precision: str, device: torch.device) -> bool:
    """bf16 for ``precision`` on ``device``: auto means bf16 on a GPU, fp32 on a CPU."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def mixed_precision_policy(bf16: bool):
    """FSDP2's policy: parameters gathered and used in bf16, gradients reduced and kept in fp32
    (the sharded fp32 parameters are the master weights AdamW updates). Inputs are not cast:
    autocast casts per op, and the loss weights must stay fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if not bf16:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(
        param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False
    )


# --- model and wrapping ---------------------------------------------------------------------


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


class TrainSetupError(CurateError):
    """The model or tokenizer to train cannot be found or loaded as configured."""


def make_model(cfg: TrainConfig, resume_from: Path | None):
    """(model, tokenizer) from a checkpoint, a local InternVL dir, vision + LLM, or a flavor."""
    for what in ("model", "tokenizer", "vision", "llm"):
        path = getattr(cfg, what)
        if path is not None and _looks_local(str(path)) and not Path(path).exists():
            raise TrainSetupError(f"train.{what}: no such directory {path}")
    try:
        return _make_model(cfg, resume_from)
    except CurateError:
        raise
    except (OSError, ValueError) as e:  # transformers: no config.json, no weights, no tokenizer
        message = " ".join(str(e).split())[:600]
        raise TrainSetupError(f"cannot load the model or tokenizer to train: {message}") from e


def _looks_local(path: str) -> bool:
    """A path, not a Hub id like ``OpenGVLab/InternVL2_5-1B`` (read from the local HF cache)."""
    return path.startswith(("/", ".", "~")) or path.count("/") != 1


def _make_model(cfg: TrainConfig, resume_from: Path | None):
    from curate.stages.train import model as m

    if resume_from is not None:
        tok = load_tokenizer(resume_from)
        return m.load_model(resume_from, tok), tok
    if cfg.model is not None:
        tok = load_tokenizer(cfg.tokenizer or cfg.model)
        return m.load_model(cfg.model, tok), tok
    if cfg.vision is not None or cfg.llm is not None:
        if cfg.vision is None or cfg.llm is None:
            raise TrainSetupError("--vision and --llm go together")
        tok = load_tokenizer(cfg.tokenizer or cfg.llm)
        return m.assemble_model(cfg.vision, cfg.llm, tok, seed=cfg.seed), tok
    if cfg.tokenizer is None:
        raise TrainSetupError(f"the {cfg.flavor} flavor needs a tokenizer (--tokenizer)")
    tok = load_tokenizer(cfg.tokenizer)
    return m.build_model(cfg.flavor, tok, seed=cfg.seed), tok


def wrap(
    module: torch.nn.Module, cfg: TrainConfig, dist: Dist, bf16: bool = False
) -> torch.nn.Module:
    """DDP, or FSDP2 sharding each transformer layer and then the whole module (in bf16:
    ``mixed_precision_policy``)."""
    if dist.world == 1:
        return module
    if cfg.distributed == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [dist.device.index] if dist.device.type == "cuda" else None
        # The ViT's expanded cls/position grads have odd strides: harmless, said once per rank.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view")
        return DDP(module, device_ids=ids)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(dist.device.type, (dist.world,))
    policy = mixed_precision_policy(bf16)
    inner = module.model.model
    for layer in [*inner.vision_tower.encoder.layer, *inner.language_model.layers]:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(module, mesh=mesh, mp_policy=policy)
    return module


def full_state(wrapped, module, optimizer, cfg: TrainConfig, dist: Dist) -> tuple[dict, dict]:
    """Model and optimizer state dicts, gathered whole under FSDP2 (a collective call)."""
    if dist.world > 1 and cfg.distributed == "fsdp2":
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        sd = get_model_state_dict(wrapped, options=opts)
        osd = get_optimizer_state_dict(wrapped, optimizer, options=opts)
        return {k.removeprefix("model."): v for k, v in sd.items()}, osd
    return module.model.state_dict(), optimizer.state_dict()


def load_optimizer(wrapped, optimizer, state: dict, cfg: TrainConfig, dist: Dist) -> None:
    if dist.world > 1 and cfg.distributed == "fsdp2":
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        set_optimizer_state_dict(
            wrapped,
            optimizer,
            optim_state_dict=state,
            options=StateDictOptions(full_state_dict=True),
        )
    else:
        optimizer.load_state_dict(state)


# --- logging --------------------------------------------------------------------------------


def plot_losses(metrics_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (Σw·CE / Σw)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def _trim_metrics(path: Path, upto_step: int) -> None:
    """On resume: drop metric lines of steps after the checkpoint (they will be redone)."""
    if path.exists():
        keep = [
            ln
            for ln in path.read_text().splitlines()
            if ln.strip() and json.loads(ln)["step"] <= upto_step
        ]
        path.write_text("".join(ln + "\n" for ln in keep))


class _Progress:
    """A rich progress bar with loss, tokens/s and tiles/s (rank 0 only, optional)."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.bar = None
        if not enabled:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"),
            TextColumn("{task.fields[tok_s]:,.0f} tok/s"),
            TextColumn("{task.fields[tile_s]:,.1f} tiles/s"),
            TimeRemainingColumn(),
        )
        self.bar.start()
        self.task = self.bar.add_task(
            "train", total=total, completed=start, loss=float("nan"), tok_s=0.0, tile_s=0.0
        )

    def update(self, loss: float, tok_s: float, tile_s: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=1, loss=loss, tok_s=tok_s, tile_s=tile_s)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


# --- the loop -------------------------------------------------------------------------------


def train(
    cfg: TrainConfig,
    run_dir: Path | None = None,
    *,
    progress: bool = True,
    stop_after: int | None = None,
) -> TrainResult:
    """Train per ``cfg``; packs from cfg.packs (or RUN/packs), outputs to cfg.out (or RUN/train).

    ``stop_after`` ends the call after that many optimizer steps of this call (tests use it to
    interrupt a run; the schedule still spans the full ``steps``).
    """
    from curate.stages.train import data as d
    from curate.stages.train import model as m
    from curate.stages.train.loss import PackedCausalLM

    packs_dir = cfg.packs or (run_dir / "packs" if run_dir else None)
    out = cfg.out or (run_dir / "train" if run_dir else None)
    if packs_dir is None or out is None:
        raise ValueError("give a run folder or both packs and out")
    out = Path(out)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards" bars between our own bar's lines
    dist = init_dist()
    stage = STAGES[cfg.stage]

    table = d.read_packs(packs_dir)
    layout = d.StepLayout(
        n_packs=len(table),
        batch_packs=cfg.batch_packs,
        accum=cfg.accum,
        world=dist.world,
        seed=cfg.seed,
    )
    total_steps = cfg.steps or layout.steps_for_epochs(cfg.epochs)

    resume_from = None
    if cfg.resume and checkpoints(out):
        resume_from = checkpoints(out)[-1]
    model, tokenizer = make_model(cfg, resume_from)
    m.freeze_except(model, stage.trains)
    drop_path = cfg.drop_path if cfg.drop_path is not None else stage.drop_path
    m.set_drop_path(model, drop_path if "vision" in stage.trains else 0.0)
    choice = m.attention_choice(cfg.attention, dist.device)
    if dist.main:  # which packed-attention path runs, and why (a GPU without flash-attn: flex)
        print(choice.line())
    attention = choice.impl
    model.set_attn_implementation(attention)
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.to(dist.device)
    model.train()

    module = PackedCausalLM(model, attention)
    bf16 = use_bf16(cfg.precision, dist.device)
    wrapped = wrap(module, cfg, dist, bf16)
    lr = cfg.lr if cfg.lr is not None else stage.lr
    warmup = warmup_steps_for(cfg, stage, total_steps)
    optimizer = torch.optim.AdamW(
        param_groups(wrapped, cfg.weight_decay),
        lr=lr,
        betas=tuple(cfg.adam_betas),
        eps=cfg.adam_eps,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_with_warmup(warmup, total_steps)
    )
    start_step = 0
    torch.manual_seed(cfg.seed * 1000 + dist.rank)  # dropout / drop path differ per rank
    random.seed(cfg.seed * 1000 + dist.rank)
    layout_state = {
        "batch_packs": cfg.batch_packs,
        "accum": cfg.accum,
        "world": dist.world,
        "seed": cfg.seed,
        "n_packs": len(table),
        "total_steps": total_steps,
    }
    if resume_from is not None:
        state = torch.load(resume_from / "trainer_state.pt", weights_only=True)
        if state["layout"] != layout_state:
            raise ValueError(
                f"cannot resume {resume_from}: data layout {state['layout']} != now {layout_state}"
            )
        load_optimizer(wrapped, optimizer, state["optimizer"], cfg, dist)
        scheduler.load_state_dict(state["scheduler"])
        start_step = int(state["step"])
        set_rng_state(torch.load(resume_from / f"rng-{dist.rank}.pt", weights_only=True))

    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    if dist.main:
        resolved = {
            **cfg.model_dump(mode="json"),
            "lr": lr,
            "warmup_steps": warmup,
            "drop_path": drop_path,
            "steps": total_steps,
            "attention": attention,
            "attention_path": choice.line(),
            "precision": "bf16" if bf16 else "fp32",
            "world": dist.world,
            "trains": list(stage.trains),
        }
        (out / "train_config.json").write_text(json.dumps(resolved, indent=2, default=str))
        if resume_from is not None:
            _trim_metrics(metrics_path, start_step)
        elif metrics_path.exists():
            metrics_path.unlink()

    end_step = total_steps if stop_after is None else min(total_steps, start_step + stop_after)
    dataset = d.PackBatches(
        table,
        layout,
        rank=dist.rank,
        start_step=start_step,
        end_step=end_step,
        image_size=m.image_size(model.config),
        tokens_per_tile=m.tokens_per_tile(model.config),
        image_token_id=model.config.image_token_id,
        reduction=cfg.loss_reduction,
        root=cfg.image_root or (run_dir if run_dir else Path(packs_dir).parent),
        augment=cfg.augment,
    )
    loader = d.make_loader(
        dataset, workers=cfg.workers, seed=cfg.seed, pin_memory=dist.device.type == "cuda"
    )
    params = [p for p in wrapped.parameters() if p.requires_grad]

    result = TrainResult(out=out, steps=start_step)
    bar = _Progress(total_steps, start_step, progress and dist.main)
    t_start = time.perf_counter()
    batches = iter(loader)
    try:
        for step in range(start_step, end_step):
            t0 = time.perf_counter()
            local = [0.0, 0.0, 0.0]  # Σ w·CE, tokens, tiles
            for micro in range(cfg.accum):
                batch = next(batches)
                assert batch["step"] == step and batch["micro"] == micro
                _record_skips(batch["skipped"], result, out, dist.rank)
                sync = micro == cfg.accum - 1 or dist.world == 1 or cfg.distributed != "ddp"
                if not batch["n_tokens"]:  # every sample of it was skipped (single process)
                    continue
                with wrapped.no_sync() if not sync else contextlib.nullcontext():
                    local[0] += micro_step(wrapped, batch, dist.device, dist.world, bf16)
                local[1] += batch["n_tokens"]
                local[2] += batch["n_tiles"]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
            step_lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            wce_sum, tokens, tiles = dist.sum(local)
            step_loss = wce_sum / float(batch["weight_sum"])
            seconds = time.perf_counter() - t0
            result.losses.append(step_loss)
            result.steps = step + 1
            if dist.main:
                row = {
                    "step": step + 1,
                    "loss": step_loss,
                    "lr": step_lr,
                    "grad_norm": float(grad_norm),
                    "tokens": int(tokens),
                    "tiles": int(tiles),
                    "tokens_per_s": tokens / seconds,
                    "tiles_per_s": tiles / seconds,
                    "epoch": (step + 1) * layout.packs_per_step / layout.n_packs,
                    "elapsed_s": time.perf_counter() - t_start,
                }
                with metrics_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
            bar.update(step_loss, tokens / seconds, tiles / seconds)
            last = step + 1 == end_step
            if last or (cfg.save_every and (step + 1) % cfg.save_every == 0):
                result.checkpoint = save_checkpoint(
                    out,
                    step + 1,
                    wrapped,
                    module,
                    optimizer,
                    scheduler,
                    tokenizer,
                    layout_state,
                    cfg,
                    dist,
                )
    finally:
        bar.close()
    if dist.main and metrics_path.exists():
        plot_losses(metrics_path, out / "loss.png")
    dist.barrier()
    if dist.world > 1:
        torch.distributed.destroy_process_group()
    return result


def _record_skips(skipped: list[dict], result: TrainResult, out: Path, rank: int) -> None:
    """Name each sample left out of a batch (an image that cannot be read any more) on the
    console and in ``skipped_samples.jsonl``; the train stage turns them into ledger rows."""
    for s in skipped:
        print(f"skipped sample {s['sample_id']} of pack {s['pack_id']}: {s['detail']}")
        with (out / "skipped_samples.jsonl").open("a") as f:
            f.write(json.dumps({**s, "rank": rank}) + "\n")
        result.skipped.append(s)


def _step(path: Path) -> int:
    return int(path.name.split("-")[1])


def follow_umask(folder: Path) -> None:
    """Give files the mode the user's umask gives (safetensors writes weights 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    for f in folder.rglob("*"):
        if f.is_file():
            f.chmod(0o666 & ~mask)


def save_checkpoint(
    out: Path,
    step: int,
    wrapped,
    module,
    optimizer,
    scheduler,
    tokenizer,
    layout_state: dict,
    cfg: TrainConfig,
    dist: Dist,
) -> Path:
    """``checkpoints/step-N``: save_pretrained + tokenizer + trainer_state.pt + rng-<rank>.pt."""
    path = out / "checkpoints" / f"step-{step:07d}"
    model_sd, optim_sd = full_state(wrapped, module, optimizer, cfg, dist)
    if dist.main:
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        module.model.save_pretrained(path, state_dict=model_sd)
        tokenizer.save_pretrained(path)
    dist.barrier()
    torch.save(rng_state(), path / f"rng-{dist.rank}.pt")
    dist.barrier()
    if dist.main:
        state = {
            "optimizer": optim_sd,
            "scheduler": scheduler.state_dict(),
            "step": step,
            "layout": layout_state,
        }
        # trainer_state.pt marks the checkpoint finished: written last, under a temp name
        # first, so a kill mid-write cannot leave a truncated "finished" checkpoint.
        tmp = path / ".trainer_state.pt.tmp"
        torch.save(state, tmp)
        follow_umask(path)
        os.replace(tmp, path / "trainer_state.pt")
        finished = checkpoints(out)
        for old in finished[: -cfg.keep_checkpoints]:
            shutil.rmtree(old)
        kept = finished[-cfg.keep_checkpoints :]
        oldest_kept = _step(kept[0]) if kept else 0
        for partial in (out / "checkpoints").glob("step-*"):  # a kill mid-rmtree or mid-save
            if not (partial / "trainer_state.pt").exists() and _step(partial) < oldest_kept:
                shutil.rmtree(partial, ignore_errors=True)
    dist.barrier()
    return path
