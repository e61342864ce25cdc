"""``curate train``: train the InternVL model on a run's pack manifests.

Multi-GPU: ``torchrun --nproc-per-node 8 -m curate.train --run DIR --model PATH --stage 2``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from curate.train.config import TrainConfig

Opt = typer.Option


def train_command(
    run: Annotated[
        Path | None, Opt(help="run folder: packs from RUN/packs, output RUN/train")
    ] = None,
    packs: Annotated[Path | None, Opt(help="pack shards folder (instead of RUN/packs)")] = None,
    out: Annotated[Path | None, Opt(help="output folder (default RUN/train)")] = None,
    flavor: Annotated[str, Opt(help="random-init model size: debug | 1b")] = "debug",
    model: Annotated[Path | None, Opt(help="local HF InternVL directory to start from")] = None,
    vision: Annotated[
        Path | None, Opt(help="HF vision tower (or InternVL) dir, with --llm")
    ] = None,
    llm: Annotated[
        Path | None, Opt(help="HF causal LM dir; fresh projector (with --vision)")
    ] = None,
    tokenizer: Annotated[Path | None, Opt(help="tokenizer dir (default: model/llm dir)")] = None,
    stage: Annotated[str, Opt(help="1: projector; 1.5: ViT + projector; 2: all")] = "2",
    steps: Annotated[int | None, Opt(help="optimizer steps (overrides --epochs)")] = None,
    epochs: Annotated[float, Opt(help="passes over the packs when --steps is unset")] = 1.0,
    batch_packs: Annotated[int, Opt(help="packs per micro-batch per rank")] = 1,
    accum: Annotated[int, Opt(help="micro-batches per optimizer step")] = 1,
    lr: Annotated[float | None, Opt(help="peak LR (default by stage: 2e-4, 1e-5, 4e-5)")] = None,
    warmup_steps: Annotated[int | None, Opt(help="warm-up steps (stage 1: 100)")] = None,
    warmup_ratio: Annotated[float | None, Opt(help="warm-up fraction (1.5, 2: 0.03)")] = None,
    weight_decay: Annotated[float, Opt(help="AdamW weight decay on matrices")] = 0.05,
    max_grad_norm: Annotated[float, Opt(help="gradient clipping norm")] = 1.0,
    drop_path: Annotated[float | None, Opt(help="ViT drop path (stage 1: 0, else 0.1)")] = None,
    loss_reduction: Annotated[str, Opt(help="token | sample | square")] = "square",
    seed: Annotated[int, Opt(help="seed of init, data order, augmentation")] = 0,
    augment: Annotated[bool, Opt(help="random JPEG compression where data_augment")] = True,
    precision: Annotated[str, Opt(help="auto | bf16 | fp32")] = "auto",
    attention: Annotated[str, Opt(help="auto | flash | varlen | sdpa | eager")] = "auto",
    grad_checkpointing: Annotated[bool, Opt(help="recompute activations in backward")] = False,
    distributed: Annotated[str, Opt(help="ddp | fsdp2 (under torchrun)")] = "ddp",
    workers: Annotated[int, Opt(help="DataLoader worker processes")] = 2,
    save_every: Annotated[int | None, Opt(help="checkpoint every N steps (and at the end)")] = None,
    keep_checkpoints: Annotated[int, Opt(help="newest checkpoints kept")] = 2,
    resume: Annotated[bool, Opt(help="continue from the newest checkpoint in --out")] = False,
    image_root: Annotated[
        Path | None, Opt(help="base of relative image paths (default: the run folder)")
    ] = None,
) -> None:
    """Train InternVL on packed sequences (stages 1, 1.5, 2); checkpoints, metrics, loss plot."""
    from pydantic import ValidationError

    from curate.console import console

    if run is None and (packs is None or out is None):
        console.print("[red]error:[/red] give --run, or both --packs and --out")
        raise typer.Exit(2)
    try:
        cfg = TrainConfig(
            packs=packs,
            out=out,
            flavor=flavor,
            model=model,
            vision=vision,
            llm=llm,
            tokenizer=tokenizer,
            stage=stage,
            steps=steps,
            epochs=epochs,
            batch_packs=batch_packs,
            accum=accum,
            lr=lr,
            warmup_steps=warmup_steps,
            warmup_ratio=warmup_ratio,
            weight_decay=weight_decay,
            max_grad_norm=max_grad_norm,
            drop_path=drop_path,
            loss_reduction=loss_reduction,
            seed=seed,
            augment=augment,
            precision=precision,
            attention=attention,
            grad_checkpointing=grad_checkpointing,
            distributed=distributed,
            workers=workers,
            save_every=save_every,
            keep_checkpoints=keep_checkpoints,
            resume=resume,
            image_root=image_root,
        )
    except ValidationError as e:
        console.print(f"[red]error:[/red] bad option: {e}")
        raise typer.Exit(2) from e
    from curate.train.stage import print_result, run_training

    try:
        result = run_training(cfg, run)
    except (FileNotFoundError, ValueError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e
    print_result(result)
