"""Training as a pipeline stage: the InternVL model on the run's packs (torch imported late).

The engine redoes training when its settings or the packs change. Training resumes itself
after a crash: the stage stamps ``RUN/train`` with what it trains on, and a rerun on the same
stamp continues from the newest checkpoint instead of starting over.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from curate.core.io import read_json, write_json_atomic
from curate.core.records import LedgerEntry, ledger_table
from curate.core.stage import GlobalInput, GlobalOutput, GlobalStage
from curate.stages.train.config import TrainConfig

STAMP = "stage_inputs.json"


def run_training(cfg: TrainConfig, run_dir: Path | None, **kwargs):
    """Train; returns loop.TrainResult."""
    from curate.stages.train.loop import train

    return train(cfg, Path(run_dir) if run_dir is not None else None, **kwargs)


class TrainStage(GlobalStage):
    """``RUN/train``: checkpoints, ``metrics.jsonl``, ``loss.png``."""

    name = "train"
    reads = ("pack",)
    speed_fields = frozenset({"workers", "save_every", "keep_checkpoints", "resume"})

    def __init__(self, config: TrainConfig) -> None:
        super().__init__(config)
        self.stop_after: int | None = None  # tests: end this call after N steps (a crash)

    def extra_inputs(self, run) -> dict[str, str]:
        packs = self.config.packs
        return {"packs": str(_external_packs(packs))} if packs is not None else {}

    def run(self, inp: GlobalInput) -> GlobalOutput:
        cfg = self.config
        out = Path(cfg.out or inp.run.path / "train")
        stamp = {"settings": self.settings(), "packs": _packs_identity(inp, cfg.packs)}
        resume = (out / STAMP).exists() and read_json(out / STAMP) == stamp
        if not resume:
            shutil.rmtree(out, ignore_errors=True)  # checkpoints of other settings or packs
            write_json_atomic(stamp, out / STAMP)
        result = run_training(
            cfg.model_copy(update={"resume": resume}), inp.run.path, stop_after=self.stop_after
        )
        if self.stop_after is not None and result.steps < (cfg.steps or 0):
            raise InterruptedError(f"training stopped after {result.steps} steps (stop_after)")
        return GlobalOutput(
            ledger=_skipped_ledger(inp, out / "skipped_samples.jsonl"),
            report={
                "optimizer_steps": result.steps,
                "checkpoint": str(result.checkpoint),
                "out": str(out),
                "resumed": resume,
            },
        )


def _packs_identity(inp: GlobalInput, packs: Path | None) -> dict:
    if packs is not None:
        return _external_packs(packs)
    marker = inp.run.marker("pack", "all")
    return marker["files"] if marker else {}


def _external_packs(packs: Path) -> dict:
    """Packs made elsewhere: their files' names, sizes and modification times."""
    files = sorted(Path(packs).glob("*.parquet"))
    return {f.name: f"{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files}


def _skipped_ledger(inp: GlobalInput, log: Path) -> pa.Table:
    """Ledger rows (rule ``image_unreadable``) of the samples training left out, once per
    (sample, pack) however often a resumed run met them."""
    if not log.exists():
        return ledger_table([])
    lines = (json.loads(x) for x in log.read_text().splitlines() if x.strip())
    skipped = list({(s["sample_id"], s["pack_id"]): s for s in lines}.values())
    ids = sorted({s["sample_id"] for s in skipped})
    samples = inp.run.read("samples", columns=["sample_id", "dataset", "line"])
    where = {
        r["sample_id"]: r
        for r in samples.filter(pc.is_in(samples["sample_id"], pa.array(ids))).to_pylist()
    }
    entries = []
    for s in skipped:
        r = where.get(s["sample_id"], {"dataset": "", "line": 0})
        entries.append(
            LedgerEntry(
                s["sample_id"],
                r["dataset"],
                r["line"],
                "train",
                "image_unreadable",
                detail=f"pack {s['pack_id']}: {s['detail']}",
            )
        )
    return ledger_table(entries)
