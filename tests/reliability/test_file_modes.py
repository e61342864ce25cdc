"""Every file and folder a run writes gets the mode the user's umask gives (0644 and 0755
under umask 022), like any file the user creates: none stays 0600 from a temp file
(``curate.core.io`` writes temp files and renames them; it sets their mode from the umask).

Each command runs in a subprocess started with the umask under test (curate reads the umask
once, at import).
"""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest

CURATE = [sys.executable, "-m", "curate.cli.main"]


def _curate(args: list[str], umask: int, log: Path) -> None:
    result = subprocess.run(
        [*CURATE, *args], umask=umask, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    with log.open("ab") as f:
        f.write(result.stdout)
    assert result.returncode == 0, result.stdout.decode()[-3000:]


def _modes(root: Path) -> dict[str, int]:
    """Permission bits of every file and folder under ``root`` (itself included)."""
    found = {".": stat.S_IMODE(root.stat().st_mode)}
    for p in sorted(root.rglob("*")):
        if not p.is_symlink():
            found[str(p.relative_to(root)) + ("/" if p.is_dir() else "")] = stat.S_IMODE(
                p.stat().st_mode
            )
    return found


def _wrong(modes: dict[str, int], umask: int) -> dict[str, str]:
    """Entries whose mode is not 0666 (files) or 0777 (folders) less the umask."""
    file_mode, dir_mode = 0o666 & ~umask, 0o777 & ~umask
    return {
        name: oct(mode)
        for name, mode in modes.items()
        if mode != (dir_mode if name.endswith("/") or name == "." else file_mode)
    }


def _write_pipeline(path: Path, run: Path, demo_dir: Path, models: dict, stages: dict) -> Path:
    path.write_text(
        json.dumps(
            {
                "run": str(run),
                "meta": str(demo_dir / "meta.json"),
                "models": {k: str(v) for k, v in models.items()},
                "stages": stages,
            }
        )
    )
    return path


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_run_outputs_follow_the_umask(umask, tmp_path, demo_dir, tokenizer_dir):
    """ingest .. pack and the report through ``curate run``, a review decision and a rerun
    (pack and report rewritten), then both exports."""
    run, log = tmp_path / "run", tmp_path / "curate.log"
    pipeline = _write_pipeline(
        tmp_path / "p.yaml",
        run,
        demo_dir,
        {"tokenizer": tokenizer_dir},
        {
            "ingest": {"shard_lines": 40},
            "budget": {},
            "filter": {"workers": 1},
            "pack": {"max_tokens": 8192, "max_tiles": 40},
            "report": {},
        },
    )
    _curate(["run", str(pipeline)], umask, log)
    _curate(["review", "--run", str(run), "--rule", "image_too_small", "--keep"], umask, log)
    _curate(["run", str(pipeline)], umask, log)
    exported, hf = tmp_path / "exported", tmp_path / "hf"
    _curate(["export", "--run", str(run), "--out", str(exported)], umask, log)
    _curate(["export", "--run", str(run), "--out", str(hf), "--format", "hf"], umask, log)

    modes = _modes(run)
    # What the checks below must cover (a mode test that saw no files would prove nothing).
    for name in (
        "run.json",
        ".lock",
        "samples/",
        "report.html",
        "repeat/copies.parquet",
        "repeat/budget_table.json",
        "stats/pack.json",
        "_done/pack/all.json",
        "ledger/filter/",
        "review/decisions.parquet",
    ):
        assert name in modes, name
    assert {n for n in modes if n.startswith("packs/") and n.endswith(".parquet")}
    assert _wrong(modes, umask) == {}
    exports = _modes(exported)
    assert "meta.json" in exports and any(n.endswith(".jsonl") for n in exports)
    assert _wrong(exports, umask) == {}
    hf_modes = _modes(hf)
    assert any(n.endswith(".arrow") for n in hf_modes)
    assert _wrong(hf_modes, umask) == {}


@pytest.fixture(scope="module")
def scored_and_trained(tmp_path_factory, demo_dir, demo_models):
    """A run with score and train too (the judge through vLLM on CPU; one training step),
    made under umask 022."""
    tmp = tmp_path_factory.mktemp("modes")
    run = tmp / "run"
    pipeline = _write_pipeline(
        tmp / "p.yaml",
        run,
        demo_dir,
        {"tokenizer": demo_models["tokenizer"], "judge": demo_models["judge"]},
        {
            "ingest": {"shard_lines": 40},
            "budget": {},
            "filter": {"workers": 1},
            "score": {
                "dtype": "float32",
                "max_model_len": 2048,
                "kv_cache_memory_bytes": 64 << 20,
                "batch_size": 64,
            },
            "pack": {"max_tokens": 4096, "max_tiles": 40},
            "train": {"flavor": "debug", "steps": 1, "workers": 0},
            "report": {},
        },
    )
    _curate(["run", str(pipeline)], 0o022, tmp / "curate.log")
    return run


def _is_weights(name: str) -> bool:
    return name.startswith("train/checkpoints/") and name.endswith(".safetensors")


@pytest.mark.slow
def test_score_and_train_outputs_follow_the_umask(scored_and_trained):
    modes = _modes(scored_and_trained)
    for name in ("_cache/score/", "stats/score.json", "train/metrics.jsonl", "train/loss.png"):
        assert name in modes, name
    assert {n for n in modes if n.startswith("scores/") and n.endswith(".parquet")}
    assert {n for n in modes if n.endswith("trainer_state.pt")}
    assert _wrong({n: m for n, m in modes.items() if not _is_weights(n)}, 0o022) == {}


@pytest.mark.slow
def test_checkpoint_weights_follow_the_umask(scored_and_trained):
    weights = {n: m for n, m in _modes(scored_and_trained).items() if _is_weights(n)}
    assert weights
    assert _wrong(weights, 0o022) == {}
