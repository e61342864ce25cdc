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
from tests.stages.train.conftest import make_tiny_packs

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


def _cpu_bf16_works() -> bool:
    try:
        a = torch.ones(8, 8, dtype=torch.bfloat16)
        return bool((a @ a)[0, 0] == 8)
    except RuntimeError:
        return False


@pytest.mark.skipif(not _cpu_bf16_works(), reason="no bf16 matmul on this CPU")
def test_bf16_on_the_cpu(small_packs, train_tokenizer, tmp_path, capsys):
    """precision=bf16: bf16 autocast over fp32 master weights and fp32 AdamW state; the loss
    follows the fp32 run within bf16 rounding; the run says which attention and precision."""
    from curate.stages.train.model import load_model

    kw = dict(steps=3, drop_path=0.0)
    fp32 = train(_cfg(small_packs, tmp_path / "fp32", train_tokenizer, **kw), progress=False)
    bf16 = train(
        _cfg(small_packs, tmp_path / "bf16", train_tokenizer, precision="bf16", **kw),
        progress=False,
    )
    assert bf16.losses == pytest.approx(fp32.losses, rel=2e-2)
    assert bf16.losses != fp32.losses  # bf16 did run
    out = capsys.readouterr().out
    assert "attention: sdpa_varlen (one SDPA call per sample, auto: the CPU fallback)" in out
    resolved = json.loads((tmp_path / "bf16" / "train_config.json").read_text())
    assert resolved["precision"] == "bf16" and resolved["attention"] == "sdpa_varlen"
    assert {p.dtype for p in load_model(bf16.checkpoint).parameters()} == {torch.float32}
    state = torch.load(bf16.checkpoint / "trainer_state.pt", weights_only=True)["optimizer"]
    moments = [t for s in state["state"].values() for k, t in s.items() if k != "step"]
    assert moments and {t.dtype for t in moments} == {torch.float32}


def test_fsdp2_mixed_precision_policy():
    """Sharded bf16: gather parameters in bf16, reduce and keep gradients in fp32, leave the
    inputs (the fp32 loss weights) alone; fp32 runs keep FSDP2's default (no casting)."""
    from curate.stages.train.loop import mixed_precision_policy, use_bf16

    policy = mixed_precision_policy(True)
    assert policy.param_dtype == torch.bfloat16 and policy.reduce_dtype == torch.float32
    assert policy.cast_forward_inputs is False
    assert mixed_precision_policy(False).param_dtype is None
    assert use_bf16("auto", torch.device("cuda")) and not use_bf16("auto", torch.device("cpu"))
    assert use_bf16("bf16", torch.device("cpu")) and not use_bf16("fp32", torch.device("cuda"))


def test_flex_on_the_cpu_is_a_one_line_error(small_packs, train_tokenizer, tmp_path):
    from curate.stages.train.model import AttentionUnavailable

    with pytest.raises(AttentionUnavailable, match="no backward on the CPU"):
        train(_cfg(small_packs, tmp_path / "o", train_tokenizer, attention="flex"), progress=False)


# --- the train stage in a run folder (packs made by the pack stage) --------------------------

PACK = {"max_tokens": 2048, "max_tiles": 8, "packs_per_shard": 8}


def _pipeline_raw(run: Path, demo_dir: Path, tokenizer: Path, train: dict | None) -> dict:
    """The pipeline the packed demo run was made with (see ``demo_packed_run``), plus train."""
    return {
        "run": str(run),
        "meta": str(demo_dir / "meta.json"),
        "models": {"tokenizer": str(tokenizer)},
        "stages": {"ingest": {"shard_lines": 40}, "budget": {}, "pack": PACK, "train": train},
    }


@pytest.fixture(scope="module")
def demo_packed_run(budgeted_run, tokenizer_dir, tmp_path_factory) -> Path:
    """The budgeted demo run packed into small packs by the engine (read-only: copy it)."""
    import shutil

    from curate.stages.pack.config import PackConfig
    from curate.stages.pack.stage import PackStage
    from curate.stages.pack.tokenize import TokenizeStage
    from tests.conftest import run_stages

    run = tmp_path_factory.mktemp("train_run") / "run"
    shutil.copytree(budgeted_run, run)
    cfg = PackConfig(**PACK)
    run_stages(run, TokenizeStage(cfg, tokenizer_dir), PackStage(cfg, tokenizer_dir))
    return run


def _metrics(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def test_cli_train(demo_packed_run, demo_dir, tokenizer_dir, run_copy, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from curate.cli.main import app

    run = run_copy(demo_packed_run)
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump(_pipeline_raw(run, demo_dir, tokenizer_dir, {})))
    sets = ["steps=1", "workers=0", "stage=1", "lr=1e-3"]
    args = ["train", "--run", str(run), "--config", str(pipeline)]
    result = CliRunner().invoke(app, [*args, *(x for s in sets for x in ("--set", s))])
    assert result.exit_code == 0, result.output
    assert "train: 1 optimizer steps" in result.output
    assert len(_metrics(run / "train")) == 1
    assert (run / "_done" / "train" / "all.json").exists()
    # Without --config the command uses the pipeline the run recorded; a bad value is an error.
    bad = CliRunner().invoke(app, ["train", "--run", str(run), "--set", "stage=3"])
    assert bad.exit_code == 2
    assert "run.json" in bad.output and "stages.train.stage" in bad.output


def test_pipeline_train_stage(demo_packed_run, demo_dir, tokenizer_dir, run_copy):
    """The pipeline section validates and its stage trains in RUN/train."""
    from curate.pipeline.config import StagesConfig, validate
    from curate.pipeline.run import Pipeline

    stages = StagesConfig.model_validate(
        {"train": {"flavor": "debug", "stage": 1, "steps": 1, "workers": 0}}
    )
    assert stages.train.stage == "1"
    with pytest.raises(ValueError, match="stepz"):
        StagesConfig.model_validate({"train": {"stepz": 3}})
    run = run_copy(demo_packed_run)

    def train_section(**train) -> object:
        raw = _pipeline_raw(run, demo_dir, tokenizer_dir, {"flavor": "debug", **train})
        return Pipeline(validate(raw, "test")).run_section("train")["train"]

    summary = train_section(stage=1, steps=1, workers=0)
    assert summary.stage == "train" and summary.redone == ["all"]
    assert summary.report["optimizer_steps"] == 1 and not summary.report["resumed"]
    assert (run / "train" / "metrics.jsonl").exists()
    checkpoint = run / "train" / "checkpoints" / "step-0000001" / "model.safetensors"
    assert checkpoint.exists()
    # A pipeline rerun with the same settings and packs does not train again ...
    before = checkpoint.stat().st_mtime_ns
    again = train_section(stage=1, steps=1, workers=0)
    assert again.redone == [] and checkpoint.stat().st_mtime_ns == before
    assert again.report["optimizer_steps"] == 1  # the recorded report
    # ... nor does a change of a setting that changes speed, not results ...
    assert train_section(stage=1, steps=1, workers=1).redone == []
    # ... but other settings do, from scratch (the other settings' checkpoints are gone).
    other = train_section(stage=1, steps=2, workers=0)
    assert other.redone == ["all"] and other.report["optimizer_steps"] == 2
    assert not other.report["resumed"] and not checkpoint.exists()
    assert [r["step"] for r in _metrics(run / "train")] == [1, 2]


def _stage(tokenizer: Path, stop_after: int | None = None, **kw):
    from curate.stages.train.stage import TrainStage

    base = dict(tokenizer=tokenizer, steps=3, lr=1e-3, warmup_steps=1, workers=0, drop_path=0.3)
    stage = TrainStage(TrainConfig(**{**base, **kw}))
    stage.stop_after = stop_after
    return stage


def _crash_after_one_step(run: Path, tokenizer: Path, **kw) -> None:
    from curate.core.io import read_json
    from curate.stages.train.stage import STAMP
    from tests.conftest import run_stages

    with pytest.raises(InterruptedError):
        run_stages(run, _stage(tokenizer, stop_after=1, save_every=1, **kw))
    assert not (run / "_done" / "train" / "all.json").exists()  # not done: redone next time
    stamp = read_json(run / "train" / STAMP)
    assert set(stamp) == {"settings", "packs"} and stamp["packs"]
    assert (run / "train" / "checkpoints" / "step-0000001").is_dir()
    assert len(_metrics(run / "train")) == 1


def test_train_stage_resumes_after_a_crash(demo_packed_run, tokenizer_dir, tmp_path):
    """A crash (stop_after) leaves checkpoints and the stamp; the rerun with the same settings
    and packs continues from the checkpoint, to the curve of an uninterrupted run."""
    import shutil

    from tests.conftest import run_stages

    full_run, run = tmp_path / "full", tmp_path / "crash"
    shutil.copytree(demo_packed_run, full_run)
    shutil.copytree(demo_packed_run, run)
    full = run_stages(full_run, _stage(tokenizer_dir))["train"]
    assert full.report["optimizer_steps"] == 3 and not full.report["resumed"]
    expected = [r["loss"] for r in _metrics(full_run / "train")]
    assert len(expected) == 3

    _crash_after_one_step(run, tokenizer_dir)
    resumed = run_stages(run, _stage(tokenizer_dir))["train"]
    assert resumed.redone == ["all"]
    assert resumed.report["resumed"] and resumed.report["optimizer_steps"] == 3
    rows = _metrics(run / "train")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["loss"] for r in rows] == pytest.approx(expected, rel=1e-6, abs=0)


@pytest.mark.parametrize("change", ["settings", "packs"])
def test_train_stage_starts_over_when_the_stamp_differs(
    change, demo_packed_run, tokenizer_dir, run_copy
):
    """Checkpoints of other settings or other packs are never resumed from."""
    from curate.stages.pack.config import PackConfig
    from curate.stages.pack.stage import PackStage
    from tests.conftest import run_stages

    run = run_copy(demo_packed_run)
    _crash_after_one_step(run, tokenizer_dir)
    kw = {}
    if change == "settings":
        kw["lr"] = 2e-3
    else:  # the same samples packed in another order
        cfg = PackConfig(**{**PACK, "seed": 1})
        assert run_stages(run, PackStage(cfg, tokenizer_dir))["pack"].redone == ["all"]
    summary = run_stages(run, _stage(tokenizer_dir, **kw))["train"]
    assert not summary.report["resumed"] and summary.report["optimizer_steps"] == 3
    assert [r["step"] for r in _metrics(run / "train")] == [1, 2, 3]
    assert not (run / "train" / "checkpoints" / "step-0000001").exists()


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
        # "--": torchrun's own parser would take --run for an ambiguous --run-path.
        "--",
        "curate.cli.train",
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("distributed", "precision"), [("ddp", "fp32"), ("fsdp2", "fp32"), ("fsdp2", "bf16")]
)
def test_two_gloo_ranks_agree_with_one(
    distributed, precision, small_packs, train_tokenizer, tmp_path
):
    """torchrun, 2 CPU ranks (gloo), 1 pack each = 1 process accumulating 2 packs (in bf16:
    FSDP2's bf16 gathers and fp32 reduction against one process's autocast, to bf16 rounding)."""
    import yaml

    from curate.stages.train.model import load_model

    meta = tmp_path / "meta.json"  # named by the pipeline; training does not read it
    meta.write_text("{}")
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(
        yaml.safe_dump(
            {
                "run": str(tmp_path / "run"),
                "meta": str(meta),
                "models": {"tokenizer": str(train_tokenizer)},
                "stages": {"train": {}},
            }
        )
    )
    sets = [
        f"packs={small_packs}",
        f"out={tmp_path / 'two'}",
        "steps=2",
        "lr=2e-3",
        "warmup_steps=1",
        "drop_path=0",
        "workers=0",
        f"distributed={distributed}",
        f"precision={precision}",
    ]
    args = ["--run", str(tmp_path / "run"), "--config", str(pipeline)]
    _run_torchrun([*args, *(x for s in sets for x in ("--set", s))], 2)
    one = train(
        _cfg(
            small_packs,
            tmp_path / "one",
            train_tokenizer,
            steps=2,
            accum=2,
            drop_path=0.0,
            precision=precision,
        ),
        progress=False,
    )
    two_rows = [
        json.loads(ln) for ln in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    ]
    exact = precision == "fp32"
    assert [r["loss"] for r in two_rows] == pytest.approx(one.losses, rel=1e-5 if exact else 2e-2)
    assert [r["tokens"] for r in two_rows] == [
        json.loads(ln)["tokens"]
        for ln in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()
    ]
    a = load_model(one.checkpoint).state_dict()
    b = load_model(tmp_path / "two" / "checkpoints" / "step-0000002").state_dict()
    if exact:
        for k in a:
            assert torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-5), k
    else:  # Adam moves a near-zero gradient by ±lr whichever side of zero bf16 rounds it
        # to: compare the whole update, not each weight (measured: 2.4% apart)
        from transformers import AutoTokenizer

        from curate.stages.train.model import build_model

        init = build_model("debug", AutoTokenizer.from_pretrained(train_tokenizer)).state_dict()
        da = torch.cat([(a[k] - init[k]).flatten() for k in a])
        db = torch.cat([(b[k] - init[k]).flatten() for k in a])
        assert float((da - db).norm() / da.norm()) <= 0.1


def test_image_broken_after_packing_is_skipped_with_a_ledger_row(
    demo_packed_run, tokenizer_dir, run_copy, tmp_path
):
    """An image that breaks after curation does not stop training: its sample is left out of
    its pack, named on the console, in ``skipped_samples.jsonl`` and in the train ledger."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from curate.core.folder import RunFolder
    from tests.conftest import run_stages

    run = run_copy(demo_packed_run)
    # The packs name their samples' tokens rows; point one row's image at a broken copy.
    packs = pq.read_table(sorted((run / "packs").glob("*.parquet"))[0]).to_pylist()
    pack = next(p for p in packs if any(p["image_counts"]))
    k = next(i for i, n in enumerate(pack["image_counts"]) if n)
    shard = run / "tokens" / f"{pack['token_shards'][k]}.parquet"
    table = pq.read_table(shard)
    images = table.column("images").to_pylist()
    row = pack["token_rows"][k]
    original = images[row][0]["path"]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(Path(original).read_bytes()[:300])
    images = [
        [{**im, "path": str(broken) if im["path"] == original else im["path"]} for im in ims]
        for ims in images
    ]
    column = table.schema.get_field_index("images")
    table = table.set_column(
        column, "images", pa.array(images, type=table.schema.field("images").type)
    )
    pq.write_table(table, shard, row_group_size=128)
    summary = run_stages(run, _stage(tokenizer_dir, steps=4))["train"]
    assert summary.report["optimizer_steps"] == 4
    ledger = RunFolder(run).ledger("train").to_pylist()
    assert ledger and {e["rule"] for e in ledger} == {"image_unreadable"}
    assert all("broken.jpg" in e["detail"] and e["dataset"] for e in ledger)
    skipped = (run / "train" / "skipped_samples.jsonl").read_text().splitlines()
    assert len(skipped) >= len(ledger)
