"""The loop: stage freezing, golden loss curve, resume, checkpoints, metrics, CLI, pipeline."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from curate.stages.train.config import TrainConfig
from curate.stages.train.loop import STAGES, cosine_with_warmup, train
from curate.stages.train.model import part_modules
from tests.train.conftest import make_tiny_packs

GOLDEN = Path(__file__).parent / "golden" / "debug_stage2_loss.json"


@pytest.fixture(scope="module")
def small_packs(tmp_path_factory, token_ids, tiny_images) -> Path:
    """4 tiny packs, at most one image per sample (cheap steps)."""
    root = tmp_path_factory.mktemp("small")
    return make_tiny_packs(root / "packs", token_ids, tiny_images, max_images=1)


def _cfg(packs: Path, out: Path, tokenizer: Path, **kw) -> TrainConfig:
    base = dict(
        packs=packs, out=out, tokenizer=tokenizer, steps=4, lr=2e-3, warmup_steps=1, workers=0
    )
    return TrainConfig(**{**base, **kw})


def test_cosine_schedule():
    f = cosine_with_warmup(warmup=2, total=6)
    assert [f(s) for s in range(3)] == [0.0, 0.5, 1.0]
    assert f(4) == pytest.approx(0.5) and f(6) == 0.0


@pytest.mark.parametrize("stage", ["1", "1.5", "2"])
def test_stage_freezing(stage, small_packs, train_tokenizer, tmp_path):
    """Frozen parts are bit-identical after training; the trained parts moved."""
    from transformers import AutoTokenizer

    from curate.stages.train.model import build_model, load_model

    before = build_model("debug", AutoTokenizer.from_pretrained(train_tokenizer), seed=0)
    res = train(
        _cfg(
            small_packs,
            tmp_path / "out",
            train_tokenizer,
            stage=stage,
            steps=1,
            batch_packs=2,
            warmup_steps=0,
        ),
        progress=False,
    )
    after = load_model(res.checkpoint)
    for part, modules in part_modules(before).items():
        old = {n: p for m in modules for n, p in m.named_parameters()}
        new_modules = part_modules(after)[part]
        new = {n: p for m in new_modules for n, p in m.named_parameters()}
        changed = [not torch.equal(old[n], new[n]) for n in old]
        if part in STAGES[stage].trains:
            assert np.mean(changed) > 0.8, part  # (a few get exactly zero gradient)
        else:
            assert not any(changed), part


@pytest.fixture(scope="module")
def debug_curve(small_packs, train_tokenizer, tmp_path_factory):
    """The debug flavor, stage 2, seed 0, 8 steps over 4 tiny packs (2 epochs)."""
    out = tmp_path_factory.mktemp("curve")
    return train(_cfg(small_packs, out, train_tokenizer, steps=8, lr=3e-3), progress=False)


def test_debug_loss_falls(debug_curve):
    losses = debug_curve.losses
    assert len(losses) == 8  # epoch 2 (steps 5-8) sees the packs of epoch 1 again, lower
    assert np.mean(losses[4:]) < np.mean(losses[:4]) - 0.3


def test_golden_loss_curve(debug_curve):
    """Fixed seed → fixed curve (regenerate with CURATE_UPDATE_GOLDEN=1 after a wanted change)."""
    losses = debug_curve.losses
    if os.environ.get("CURATE_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({"losses": losses}, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())["losses"]
    assert np.allclose(losses, golden, rtol=1e-4, atol=0), (losses, golden)


def test_metrics_plot_and_checkpoint_files(debug_curve):
    from transformers import InternVLForConditionalGeneration

    out = debug_curve.out
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert all(r["tokens_per_s"] > 0 and r["tiles"] >= 0 for r in rows)
    assert (out / "loss.png").stat().st_size > 1000
    ckpt = debug_curve.checkpoint
    model = InternVLForConditionalGeneration.from_pretrained(ckpt)  # plain transformers
    assert model.config.image_token_id > 0
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    assert state["step"] == 8 and "state" in state["optimizer"]
    torch.load(ckpt / "rng-0.pt", weights_only=True)


def test_resume_continues_the_same_curve(small_packs, train_tokenizer, tmp_path):
    """Stopped after 2 steps and resumed (with DataLoader workers) = uninterrupted."""
    kw = dict(steps=3, drop_path=0.3)  # drop path: the RNG state must carry over
    full = train(_cfg(small_packs, tmp_path / "a", train_tokenizer, **kw), progress=False)
    first = train(
        _cfg(small_packs, tmp_path / "b", train_tokenizer, **kw), progress=False, stop_after=1
    )
    rest = train(
        _cfg(small_packs, tmp_path / "b", train_tokenizer, resume=True, workers=2, **kw),
        progress=False,
    )
    assert first.steps == 1 and rest.steps == 3
    assert first.losses + rest.losses == pytest.approx(full.losses, rel=1e-6, abs=0)
    logged = [
        json.loads(ln)["loss"] for ln in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    ]
    assert logged == pytest.approx(full.losses, rel=1e-6, abs=0)


def test_cli_train(small_packs, train_tokenizer, tmp_path):
    from typer.testing import CliRunner

    from curate.cli.main import app

    result = CliRunner().invoke(
        app,
        [
            "train",
            "--packs",
            str(small_packs),
            "--out",
            str(tmp_path / "o"),
            "--tokenizer",
            str(train_tokenizer),
            "--steps",
            "1",
            "--workers",
            "0",
            "--stage",
            "1",
            "--lr",
            "1e-3",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "train: 1 optimizer steps" in result.output
    assert (tmp_path / "o" / "metrics.jsonl").exists()
    bad = CliRunner().invoke(
        app, ["train", "--packs", str(small_packs), "--out", str(tmp_path / "o"), "--stage", "3"]
    )
    assert bad.exit_code == 2


def test_pipeline_train_stage(tiny_run, train_tokenizer):
    """The pipeline section validates and its runner trains in RUN/train."""
    from curate.pipeline.config import ModelsConfig, PipelineConfig, StagesConfig
    from curate.pipeline.run import STAGE_RUNNERS, PipelineContext
    from curate.core.folder import RunFolder

    stages = StagesConfig.model_validate(
        {"train": {"flavor": "debug", "stage": 1, "steps": 1, "workers": 0}}
    )
    assert stages.train.stage == "1"
    with pytest.raises(ValueError, match="stepz"):
        StagesConfig.model_validate({"train": {"stepz": 3}})
    config = PipelineConfig.model_construct(
        run=tiny_run,
        meta=tiny_run / "meta.json",
        stages=stages,
        models=ModelsConfig(tokenizer=train_tokenizer),
    )
    summary = STAGE_RUNNERS["train"](PipelineContext(config, RunFolder(tiny_run)))
    assert summary.stage == "train"
    assert (tiny_run / "train" / "metrics.jsonl").exists()
    checkpoint = tiny_run / "train" / "checkpoints" / "step-0000001" / "model.safetensors"
    assert checkpoint.exists()
    # A pipeline rerun with the same settings and packs does not train again ...
    before = checkpoint.stat().st_mtime_ns
    again = STAGE_RUNNERS["train"](PipelineContext(config, RunFolder(tiny_run)))
    assert again.rows_in == 1 and checkpoint.stat().st_mtime_ns == before
    # ... but other settings do.
    stages2 = StagesConfig.model_validate(
        {"train": {"flavor": "debug", "stage": 1, "steps": 2, "workers": 0}}
    )
    config2 = config.model_copy(update={"stages": stages2})
    assert STAGE_RUNNERS["train"](PipelineContext(config2, RunFolder(tiny_run))).rows_in == 2


def _run_torchrun(args: list[str], nproc: int) -> None:
    import subprocess
    import sys

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        "-m",
        "curate.stages.train",
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("distributed", ["ddp", "fsdp2"])
def test_two_gloo_ranks_agree_with_one(distributed, small_packs, train_tokenizer, tmp_path):
    """torchrun, 2 CPU ranks (gloo), 1 pack each = 1 process accumulating 2 packs."""
    from curate.stages.train.model import load_model

    common = [
        "--packs",
        str(small_packs),
        "--tokenizer",
        str(train_tokenizer),
        "--steps",
        "2",
        "--lr",
        "2e-3",
        "--warmup-steps",
        "1",
        "--drop-path",
        "0",
        "--workers",
        "0",
    ]
    _run_torchrun([*common, "--out", str(tmp_path / "two"), "--distributed", distributed], 2)
    one = train(
        _cfg(small_packs, tmp_path / "one", train_tokenizer, steps=2, accum=2, drop_path=0.0),
        progress=False,
    )
    two_rows = [
        json.loads(ln) for ln in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["loss"] for r in two_rows] == pytest.approx(one.losses, rel=1e-5, abs=0)
    assert [r["tokens"] for r in two_rows] == [
        json.loads(ln)["tokens"]
        for ln in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()
    ]
    a = load_model(one.checkpoint).state_dict()
    b = load_model(tmp_path / "two" / "checkpoints" / "step-0000002").state_dict()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-5), k
