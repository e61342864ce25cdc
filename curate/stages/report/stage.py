"""The report as the pipeline's last stage: one self-contained HTML file of the whole run."""

from __future__ import annotations

from curate.core.folder import RunFolder
from curate.core.io import file_hash
from curate.core.stage import GlobalInput, GlobalOutput, GlobalStage
from curate.core.status import decisions_path
from curate.stages.report.config import ReportConfig
from curate.stages.report.tables import load_run_tables, status_counts
from curate.stages.report.write import write_report


class ReportStage(GlobalStage):
    """``RUN/report.html`` (or ``out``): counts, plots, rejected samples per rule.

    Its inputs are every stage before it and the review decisions, so it is rewritten
    exactly when something it shows changed.
    """

    name = "report"

    def __init__(self, config: ReportConfig, reads: tuple[str, ...] = ()) -> None:
        super().__init__(config)
        self.reads = reads

    def settings(self) -> dict:
        return self.config.model_dump(mode="json")

    def extra_inputs(self, run: RunFolder) -> dict[str, str]:
        path = decisions_path(run)
        return {"review": file_hash(path) if path.exists() else ""}

    def run(self, inp: GlobalInput) -> GlobalOutput:
        cfg = self.config
        tables = load_run_tables(inp.run)
        result = write_report(tables, cfg.out, per_rule=cfg.per_rule, thumb_px=cfg.thumbnail_px)
        status = status_counts(tables)
        return GlobalOutput(
            written=[result.path],
            report={
                "path": str(result.path.resolve()),
                "bytes": result.bytes,
                "samples": int(status["samples"].sum()),
                **{s: int(status[s].sum()) for s in ("keep", "reject", "flag")},
                "ledger_rows": len(tables.ledger),
                "decisions": len(tables.decisions),
                "plots": result.plots,
                "rules": result.rules,
                "shown": result.shown,
                "not_shown": result.not_shown,
                "by_dataset": {
                    r["dataset"]: [r["samples"], r["keep"], r["reject"], r["flag"]]
                    for r in status.select("dataset", "samples", "keep", "reject", "flag")
                    .sort("dataset")
                    .iter_rows(named=True)
                },
            },
        )
