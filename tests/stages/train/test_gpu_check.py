"""bench/gpu_check.py: its imports fit the GPU machine, and its smoke run works on the CPU.

The GPU machine has torch, transformers, numpy, pyarrow, pillow, xxhash, typer and rich, but
no vLLM, polars, pydantic, orjson, datasets or rensa, and no installed curate: the script reads
this checkout and must import only the modules below from it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "bench" / "gpu_check.py"
CURATE_MODULES = {
    "curate",
    "curate.core",
    "curate.core.chat",
    "curate.core.errors",
    "curate.stages",
    "curate.stages.pack",
    "curate.stages.pack.binpack",
    "curate.stages.pack.bounds",  # the packer plans with its LP (scipy: on the GPU image)
    "curate.stages.pack.internvl_packer",
    "curate.stages.train",
    "curate.stages.train.loop",
    "curate.stages.train.loss",
    "curate.stages.train.model",
}
NOT_ON_THE_GPU_MACHINE = {"vllm", "polars", "pydantic", "orjson", "datasets", "rensa"}

# Runs the script as `python bench/gpu_check.py ARGS` would, then lists what was imported.
RUNNER = """
import json, runpy, sys
args = json.loads(sys.argv[1])
sys.argv = ["bench/gpu_check.py", *args]
if args:
    runpy.run_path("bench/gpu_check.py", run_name="__main__")
else:
    runpy.run_path("bench/gpu_check.py", run_name="gpu_check")
print("MODULES " + json.dumps(sorted(sys.modules)))
"""


def _run(args: list[str], timeout: int) -> tuple[str, set[str]]:
    env = {**os.environ, "PYTHONPATH": ""}  # curate from the checkout, as on the GPU machine
    done = subprocess.run(
        [sys.executable, "-c", RUNNER, json.dumps(args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("MODULES "))
    return done.stdout, set(json.loads(line.removeprefix("MODULES ")))


def _check_modules(modules: set[str]) -> None:
    ours = {n for n in modules if n == "curate" or n.startswith("curate.")}
    assert ours <= CURATE_MODULES, sorted(ours - CURATE_MODULES)
    assert not {n.split(".")[0] for n in modules} & NOT_ON_THE_GPU_MACHINE


def test_gpu_check_imports_fit_the_gpu_machine():
    _, modules = _run([], timeout=300)
    _check_modules(modules)


@pytest.mark.slow
def test_gpu_check_smoke_run(tmp_path):
    """The whole check on the CPU (debug flavor, tiny packs): every section runs, every
    exactness check passes, and nothing outside the GPU machine's packages is imported."""
    out, modules = _run(["--cpu-smoke", "--json", str(tmp_path / "gc.json")], timeout=1200)
    _check_modules(modules)
    rows = json.loads((tmp_path / "gc.json").read_text())["rows"]
    assert not [r for r in rows if r["value"].startswith(("FAILED", "skipped"))], out[-3000:]
    sections = {r["section"].split(",")[0] for r in rows}
    assert sections >= {"machine", "data", "packed == per-sample", "train", "packed vs padded"}
    exact = [r for r in rows if r["section"].startswith("packed == per-sample")]
    paths = {r["setting"].split(" -> ")[1] for r in exact}
    assert paths == {"sdpa_varlen", "flex_varlen", "sdpa"}
    assert all(r["ok"] for r in exact), exact
    assert [r for r in rows if r["setting"].startswith("packed / length-grouped")]
    assert "| section" in out  # the table
