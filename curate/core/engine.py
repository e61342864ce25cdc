"""The run engine: all the bookkeeping of every stage, in one place.

For each stage it runs, the engine

1. computes each unit's (shard's, or the global stage's) **inputs**: the hash of its settings,
   the output hash of every upstream unit it reads (taken from the upstream markers), and
   inputs outside the run (annotation bytes, review decisions);
2. compares them with the unit's marker: equal inputs mean done; otherwise it says why
   (settings changed, ``filter/shard-3`` changed, new shard) and redoes the unit. Shards that
   no longer exist upstream are removed with their rows, ledger and marker;
3. runs the units (shards on an executor, a global stage here), checks the count invariant
   (every input sample comes out once: as a row or as a rejection), writes rows and ledger
   atomically and the marker last (a crash leaves a unit done or to redo, never half done);
4. totals the markers into ``stats/<stage>.json`` and reports progress events.

Because a marker records the *output* hash of the inputs it read, a change redoes exactly the
units that read something that changed, and downstream of them only what changed again.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from curate.core.errors import CurateError
from curate.core.executors import Executor, LocalExecutor
from curate.core.folder import CountInvariantError, RunFolder
from curate.core.io import file_hash, write_json_atomic, write_parquet_atomic
from curate.core.records import LEDGER_SCHEMA
from curate.core.stage import (
    GlobalInput,
    GlobalOutput,
    GlobalStage,
    ShardInput,
    ShardOutput,
    ShardStage,
    Stage,
)

GLOBAL = "all"  # the marker name of a global stage


class StageOrderError(CurateError):
    """A stage's upstream is missing or stale: run the earlier stages first."""


@dataclass
class Unit:
    """One shard of a shard stage, or a global stage: what it needs and whether it is done."""

    name: str
    inputs: dict[str, str]
    fingerprint: str
    state: str  # done | redo | new
    why: str = ""


@dataclass
class StagePlan:
    stage: str
    kind: str  # shard | global
    units: list[Unit] = field(default_factory=list)
    remove: list[str] = field(default_factory=list)  # shards gone upstream
    blocked: str = ""  # an upstream stage is missing: nothing can be planned

    @property
    def todo(self) -> list[Unit]:
        return [u for u in self.units if u.state != "done"]


@dataclass
class StageSummary:
    """A stage's totals over all its units; row counts are samples (None: not a sample stage)."""

    stage: str
    kind: str = "shard"
    shards: int = 0
    redone: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    rows_in: int | None = 0
    rows_kept: int | None = 0
    rows_rejected: int | None = 0
    rows_flagged: int | None = 0
    seconds: float = 0.0
    by_dataset: dict[str, list[int]] = field(default_factory=dict)  # in, kept, rejected, flagged
    by_rule: dict[str, int] = field(default_factory=dict)  # "severity:rule" -> samples
    report: dict = field(default_factory=dict)

    @property
    def shards_skipped(self) -> int:
        return self.shards - len(self.redone)


@dataclass
class Event:
    """Progress: ``kind`` start (total units to do, done: units already done before this run,
    which a bar counts as finished), unit (one finished), end.

    ``shards`` is False for a global stage (one unit: a bar says nothing)."""

    stage: str
    kind: str
    total: int = 0
    done: int = 0
    unit: str = ""
    rows: int = 0
    shards: bool = True


def digest(obj: object) -> str:
    return xxhash.xxh3_64_hexdigest(orjson.dumps(obj, option=orjson.OPT_SORT_KEYS))


def _run_shard(
    stage: ShardStage, run_path: str, respects: tuple[str, ...], shard: str
) -> ShardOutput:
    # Module level so executors can pickle it with the stage.
    return stage.process(ShardInput(run_path, shard, respects))


class Engine:
    """Runs stages of one pipeline in one run folder (the caller holds the run's lock)."""

    def __init__(
        self,
        run: RunFolder,
        stages: Sequence[Stage],
        executor: Executor | None = None,
        on_event: Callable[[Event], None] | None = None,
    ) -> None:
        self.run = run
        self.stages = {s.name: s for s in stages}
        self.order = [s.name for s in stages]
        self.executor = executor or LocalExecutor()
        self.on_event = on_event or (lambda e: None)

    # -- inputs ---------------------------------------------------------------------------------
    def _upstream(self, stage: Stage) -> list[str]:
        names = [*stage.reads, *stage.respects, *getattr(stage, "requires", ())]
        return list(dict.fromkeys(n for n in names if n in self.stages))

    def _respected(self, stage: Stage) -> tuple[str, ...]:
        """The respected stages this pipeline has: a stage left out of the pipeline file
        (its old ledger may still be on disk) removes nothing from the input."""
        return tuple(n for n in stage.respects if n in self.stages)

    def _output_of(self, name: str, shard: str | None) -> str | None:
        """The output hash of an upstream unit (None: it has not run)."""
        upstream = self.stages[name]
        if isinstance(upstream, ShardStage):
            if shard is None:
                markers = self.run.markers(name)
                return digest({k: m["output"] for k, m in markers.items()}) if markers else None
            marker = self.run.marker(name, shard)
            return marker["output"] if marker else None
        marker = self.run.marker(name, GLOBAL)
        if marker is None:
            return None
        # A global stage that writes one file per shard (the duplicate pass) is read per shard.
        part = f"{upstream.table}/{shard}.parquet"
        return marker["files"].get(part, marker["output"]) if shard else marker["output"]

    def _inputs(self, stage: Stage, shard: str | None, extra: dict[str, str]) -> dict[str, str]:
        inputs = {"settings": digest(stage.settings()), **extra}
        for name in self._upstream(stage):
            out = self._output_of(name, shard)
            if out is None:
                where = f" shard {shard}" if shard else ""
                raise StageOrderError(f"{stage.name} needs {name}{where}, which has not run yet")
            inputs[name if shard is None else f"{name}/{shard}"] = out
        return inputs

    # -- planning -------------------------------------------------------------------------------
    def plan(self, name: str) -> StagePlan:
        """What running ``name`` now would redo, and why (nothing is run or written)."""
        stage = self.stages[name]
        kind = "shard" if isinstance(stage, ShardStage) else "global"
        plan = StagePlan(name, kind)
        missing = [u for u in self._upstream(stage) if not self.run.markers(u)]
        if missing:
            plan.blocked = f"{name} needs {missing[0]}, which has not run yet"
            return plan
        try:
            extra = stage.extra_inputs(self.run)
            if isinstance(stage, ShardStage):
                shards = stage.shards(self.run)
                for shard in shards:
                    extra_shard = {**extra, **stage.shard_inputs(self.run, shard)}
                    inputs = self._inputs(stage, shard, extra_shard)
                    plan.units.append(self._unit(name, shard, inputs))
                plan.remove = sorted(set(self.run.markers(name)) - set(shards))
            else:
                plan.units.append(self._unit(name, GLOBAL, self._inputs(stage, None, extra)))
        except StageOrderError as e:
            plan.blocked = str(e)
        return plan

    def _unit(self, stage: str, name: str, inputs: dict[str, str]) -> Unit:
        fingerprint = digest(inputs)
        marker = self.run.marker(stage, name)
        if marker is None:
            return Unit(name, inputs, fingerprint, "new", "not done yet")
        if marker.get("fingerprint") != fingerprint:
            return Unit(name, inputs, fingerprint, "redo", _why(marker.get("inputs", {}), inputs))
        # A global stage's files must still be there (someone may have deleted report.html).
        gone = [f for f in marker.get("files", {}) if not (self.run.path / f).exists()]
        if gone:
            return Unit(name, inputs, fingerprint, "redo", f"output missing: {gone[0]}")
        return Unit(name, inputs, fingerprint, "done")

    # -- running --------------------------------------------------------------------------------
    def run_stages(self, names: Sequence[str] | None = None) -> dict[str, StageSummary]:
        return {name: self.run_stage(name) for name in (names or self.order)}

    def run_stage(self, name: str) -> StageSummary:
        """Bring one stage up to date with its inputs and settings; returns its totals."""
        plan = self.plan(name)
        if plan.blocked:
            raise StageOrderError(plan.blocked)
        stage = self.stages[name]
        t0 = time.perf_counter()
        sharded = isinstance(stage, ShardStage)
        done = len(plan.units) - len(plan.todo)
        self.on_event(Event(name, "start", total=len(plan.todo), done=done, shards=sharded))
        for shard in plan.remove:
            self._remove(stage, shard)
        if isinstance(stage, ShardStage):
            self._run_shards(stage, plan)
        elif plan.todo:
            self._run_global(stage, plan.units[0])
        summary = self._summary(stage, plan, time.perf_counter() - t0)
        write_json_atomic(asdict(summary), self.run.stats_path(name))
        self.on_event(Event(name, "end", total=len(plan.todo), shards=sharded))
        return summary

    def _remove(self, stage: Stage, shard: str) -> None:
        self.run.marker_path(stage.name, shard).unlink(missing_ok=True)
        self.run.shard_path(stage.table, shard).unlink(missing_ok=True)
        self.run.ledger_path(stage.name, shard).unlink(missing_ok=True)

    def _run_shards(self, stage: ShardStage, plan: StagePlan) -> None:
        stage.prepare(self.run)
        todo = {u.name: u for u in plan.todo}
        if not todo:
            return
        for name in todo:  # a shard being redone is not done until its new marker exists
            self.run.marker_path(stage.name, name).unlink(missing_ok=True)
        process = partial(_run_shard, stage, str(self.run.path), self._respected(stage))
        if getattr(stage, "runs_on_driver", False):
            executor, workers = LocalExecutor(), 1  # holds an engine (the judge): no pickling
        else:
            executor, workers = self.executor, stage.workers
        for shard, out, seconds in executor.map_shards(process, list(todo), workers=workers):
            marker = self._commit_shard(stage, todo[shard], out, seconds)
            self.on_event(Event(stage.name, "unit", unit=shard, rows=marker["rows_in"]))

    def _commit_shard(self, stage: ShardStage, unit: Unit, out: ShardOutput, seconds: float):
        ledger = out.ledger.cast(LEDGER_SCHEMA)
        if out.rows_in is None:
            inp = ShardInput(str(self.run.path), unit.name, self._respected(stage))
            counts = count_rows(stage.name, unit.name, inp.samples(KEY_COLUMNS), out.rows, ledger)
        else:
            counts = count_source(stage.name, unit.name, out.rows_in, out.rows, ledger)
        rows_path = self.run.shard_path(stage.table, unit.name)
        ledger_path = self.run.ledger_path(stage.name, unit.name)
        write_parquet_atomic(out.rows, rows_path, stage.row_group_rows)
        write_parquet_atomic(ledger, ledger_path)
        output = digest([file_hash(rows_path), file_hash(ledger_path)])
        marker = {
            "fingerprint": unit.fingerprint,
            "inputs": unit.inputs,
            "output": output,
            "seconds": round(seconds, 3),
            **counts,
        }
        write_json_atomic(marker, self.run.marker_path(stage.name, unit.name))
        return marker

    def _run_global(self, stage: GlobalStage, unit: Unit) -> None:
        self.run.marker_path(stage.name, GLOBAL).unlink(missing_ok=True)
        staging = self.run.path / ".staging" / stage.name
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        requires = {n: self.stages[n].table for n in stage.requires if n in self.stages}
        inp = GlobalInput(self.run, staging, self._respected(stage), requires, stage.flagged)
        t0 = time.perf_counter()
        out = stage.run(inp)
        counts = self._global_counts(stage, inp, out)
        files = {}
        for folder in stage.outputs:
            files.update(_swap_in(staging / folder, self.run.path / folder))
        if out.rows is not None:
            path = self.run.shard_path(stage.table, GLOBAL)
            write_parquet_atomic(out.rows, path)
            files[f"{stage.table}/{GLOBAL}.parquet"] = file_hash(path)
        if out.ledger is not None:
            write_parquet_atomic(
                out.ledger.cast(LEDGER_SCHEMA), self.run.ledger_path(stage.name, GLOBAL)
            )
        shutil.rmtree(staging, ignore_errors=True)
        marker = {
            "fingerprint": unit.fingerprint,
            "inputs": unit.inputs,
            "output": digest(files or unit.fingerprint),
            "files": files,
            "seconds": round(time.perf_counter() - t0, 3),
            "report": out.report,
            **counts,
        }
        write_json_atomic(marker, self.run.marker_path(stage.name, GLOBAL))
        self.on_event(
            Event(stage.name, "unit", unit=GLOBAL, rows=counts.get("rows_in") or 0, shards=False)
        )

    def _global_counts(self, stage: GlobalStage, inp: GlobalInput, out: GlobalOutput) -> dict:
        if out.rows is None:
            return {}
        ledger = (out.ledger or LEDGER_SCHEMA.empty_table()).cast(LEDGER_SCHEMA)
        if inp.respects or inp.requires:
            import polars as pl

            status = inp.status().filter(pl.col("status") == "keep").select("sample_id")
            samples = self.run.read("samples", columns=KEY_COLUMNS)
            keep = pc.is_in(samples["sample_id"], status.to_arrow()["sample_id"])
            eligible = samples.filter(keep)
        else:
            eligible = self.run.read("samples", columns=KEY_COLUMNS)
        return count_rows(stage.name, GLOBAL, eligible, out.rows, ledger)

    # -- totals ---------------------------------------------------------------------------------
    def _summary(self, stage: Stage, plan: StagePlan, seconds: float) -> StageSummary:
        markers = self.run.markers(stage.name)
        summary = StageSummary(
            stage.name,
            plan.kind,
            shards=len(markers),
            redone=[u.name for u in plan.todo],
            removed=plan.remove,
            seconds=round(seconds, 3),
        )
        sample_stage = all("rows_in" in m for m in markers.values()) and markers
        if not sample_stage:
            summary.rows_in = summary.rows_kept = summary.rows_rejected = None
            summary.rows_flagged = None
        for marker in markers.values():
            summary.report.update(marker.get("report", {}))
            if not sample_stage:
                continue
            for key in ("rows_in", "rows_kept", "rows_rejected", "rows_flagged"):
                setattr(summary, key, getattr(summary, key) + marker[key])
            for ds, counts in marker["by_dataset"].items():
                acc = summary.by_dataset.setdefault(ds, [0] * len(counts))
                summary.by_dataset[ds] = [a + b for a, b in zip(acc, counts, strict=True)]
            for rule, n in marker["by_rule"].items():
                summary.by_rule[rule] = summary.by_rule.get(rule, 0) + n
        return summary


KEY_COLUMNS = ["sample_id", "dataset", "line"]


def _keys(table: pa.Table, by_line: bool) -> list:
    if by_line:  # ingest counts input lines: one row per (dataset, line), whatever its id
        return list(zip(table["dataset"].to_pylist(), table["line"].to_pylist(), strict=True))
    return table["sample_id"].to_pylist()


def _ledger_sets(ledger: pa.Table, by_line: bool) -> tuple[dict, dict, Counter]:
    """Rejected and flagged keys (-> dataset), and samples per severity:rule."""
    rejected, flagged, rules = {}, {}, Counter()
    keys = _keys(ledger, by_line)
    seen = set()
    for key, ds, rule, sev in zip(
        keys,
        ledger["dataset"].to_pylist(),
        ledger["rule"].to_pylist(),
        ledger["severity"].to_pylist(),
        strict=True,
    ):
        (rejected if sev == "reject" else flagged)[key] = ds
        if (key, rule, sev) not in seen:
            seen.add((key, rule, sev))
            rules[f"{sev}:{rule}"] += 1
    return rejected, flagged, rules


def _by_dataset(pairs: dict, index: int, acc: dict[str, list[int]]) -> None:
    for ds in pairs.values():
        acc.setdefault(ds, [0, 0, 0, 0])[index] += 1


def count_rows(stage: str, unit: str, inputs: pa.Table, rows: pa.Table, ledger: pa.Table) -> dict:
    """Counts of one unit, checking every input sample comes out once (a row or a rejection).

    A stage may keep a row for a sample it rejects (score keeps every score); kept = rows not
    rejected. Raises CountInvariantError when a sample is lost, invented or written twice.
    """
    ins = dict(zip(_keys(inputs, False), inputs["dataset"].to_pylist(), strict=True))
    out = dict(zip(_keys(rows, False), rows["dataset"].to_pylist(), strict=True))
    rejected, flagged, rules = _ledger_sets(ledger, False)
    problems = []
    if len(out) != rows.num_rows:
        problems.append(f"{rows.num_rows - len(out)} samples written twice")
    if lost := set(ins) - set(out) - set(rejected):
        problems.append(f"{len(lost)} input samples neither kept nor rejected (e.g. {min(lost)})")
    if invented := (set(out) | set(rejected) | set(flagged)) - set(ins):
        problems.append(f"{len(invented)} samples not in the input (e.g. {min(invented)})")
    if problems:
        raise CountInvariantError(f"{stage}/{unit}: " + "; ".join(problems))
    kept = {k: ds for k, ds in ins.items() if k not in rejected}
    flagged = {k: ds for k, ds in flagged.items() if k in kept}
    return _counts(ins, kept, {k: ins[k] for k in rejected}, flagged, rules)


def count_source(stage: str, unit: str, rows_in: int, rows: pa.Table, ledger: pa.Table) -> dict:
    """Counts of a source stage's shard (ingest): lines read = samples + rejected lines."""
    out = dict(zip(_keys(rows, True), rows["dataset"].to_pylist(), strict=True))
    rejected, flagged, rules = _ledger_sets(ledger, True)
    if rows_in != len(out) + len(rejected) or set(out) & set(rejected):
        raise CountInvariantError(
            f"{stage}/{unit}: rows in {rows_in} != kept {len(out)} + rejected {len(rejected)}"
        )
    ins = {**out, **rejected}
    return _counts(ins, out, rejected, {k: d for k, d in flagged.items() if k in out}, rules)


def _counts(ins: dict, kept: dict, rejected: dict, flagged: dict, rules: Counter) -> dict:
    by_ds: dict[str, list[int]] = {}
    for index, part in enumerate((ins, kept, rejected, flagged)):
        _by_dataset(part, index, by_ds)
    return {
        "rows_in": len(ins),
        "rows_kept": len(kept),
        "rows_rejected": len(rejected),
        "rows_flagged": len(flagged),
        "by_dataset": by_ds,
        "by_rule": dict(rules),
    }


def _why(before: dict[str, str], now: dict[str, str]) -> str:
    """Which inputs changed, in words (settings first, then at most three upstream units)."""
    if before.get("settings") != now.get("settings"):
        return "settings changed"
    changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
    return "input changed: " + ", ".join(changed[:3]) + more if changed else "inputs changed"


def _swap_in(staged: Path, final: Path) -> dict[str, str]:
    """Replace ``final`` by ``staged`` (a folder); returns the hash of every file in it."""
    files = {}
    if staged.is_dir():
        for p in sorted(staged.rglob("*")):
            if p.is_file():
                files[f"{final.name}/{p.relative_to(staged)}"] = file_hash(p)
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    if staged.is_dir():
        staged.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return files
