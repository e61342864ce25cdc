"""SIGKILL ``curate run`` at random points, rerun, and compare with an uninterrupted run:
outputs byte-identical, no sample lost or duplicated. Also: two runs on one folder at once."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Everything a stage writes as data; markers and stats carry timings and are compared by count.
DATA_DIRS = ("samples", "budget", "filter", "repeat", "tokens", "packs", "ledger")


def _pipeline(tmp_path: Path, demo_dir: Path, tokenizer: Path, run: Path) -> Path:
    p = tmp_path / f"{run.name}.yaml"
    p.write_text(
        f"run: {run}\nmeta: {demo_dir / 'meta.json'}\nmodels:\n  tokenizer: {tokenizer}\n"
        "stages:\n  ingest: {shard_lines: 15}\n  budget: {}\n  filter: {workers: 1}\n"
        "  pack: {max_tokens: 8192, max_tiles: 40, packs_per_shard: 4}\n"
    )
    return p


def _curate(pipeline: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "curate.cli.main", "run", str(pipeline)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _data_files(run: Path) -> dict[str, bytes]:
    files = {}
    for d in DATA_DIRS:
        for p in sorted((run / d).rglob("*")):
            if p.is_file():
                files[str(p.relative_to(run))] = p.read_bytes()
    return files


def _markers(run: Path) -> int:
    return sum(1 for _ in (run / "_done").rglob("*.json")) if (run / "_done").exists() else 0


def _stage_running(run: Path) -> str:
    done = run / "_done"
    for stage in ("tokenize", "filter", "budget", "ingest"):
        if (done / stage).exists():
            return stage
    return "start"


@pytest.mark.slow
def test_sigkill_and_resume_is_byte_identical(tmp_path, demo_dir, tokenizer_dir):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    ref_proc = _curate(_pipeline(tmp_path, demo_dir, tokenizer_dir, ref))
    out, _ = ref_proc.communicate(timeout=600)
    assert ref_proc.returncode == 0, out.decode()[-3000:]

    # Each attempt lives until it has finished 1-4 more shards, plus a random moment (often
    # in the middle of the next shard's writes), and dies: the run creeps through every stage.
    rng = random.Random(1234)
    pipeline = _pipeline(tmp_path, demo_dir, tokenizer_dir, killed)
    kills, stages = 0, []
    for _ in range(60):
        proc = _curate(pipeline)
        target = _markers(killed) + rng.randint(1, 4)
        while _markers(killed) < target and proc.poll() is None:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.3))
        if proc.poll() is not None:  # it finished before the kill: start over, kill sooner
            proc.communicate()
            if kills >= 20:
                break
            for p in killed.rglob("*"):
                if p.is_file():
                    p.unlink()
            continue
        stages.append(_stage_running(killed))
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
        kills += 1
        if kills >= 24:
            break
    assert kills >= 20 and len(set(stages)) >= 3, stages
    final = _curate(pipeline)
    out, _ = final.communicate(timeout=600)
    assert final.returncode == 0, out.decode()[-3000:]

    a, b = _data_files(ref), _data_files(killed)
    assert sorted(a) == sorted(b)
    assert [k for k in a if a[k] != b[k]] == []
    assert not list(killed.rglob(".*.tmp"))


@pytest.mark.slow
def test_second_run_on_same_folder_is_refused(tmp_path, demo_dir, tokenizer_dir):
    run = tmp_path / "run"
    pipeline = _pipeline(tmp_path, demo_dir, tokenizer_dir, run)
    first = _curate(pipeline)
    deadline = time.monotonic() + 120
    while not (run / ".lock").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    second = _curate(pipeline)
    out2, _ = second.communicate(timeout=120)
    out1, _ = first.communicate(timeout=600)
    assert second.returncode == 2
    assert "in use by another curate process" in out2.decode()
    assert first.returncode == 0, out1.decode()[-2000:]  # the first run was not disturbed
