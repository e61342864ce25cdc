"""Inspection of a run folder: tables, plots, HTML sample cards, the self-contained report.

Used by ``curate report`` and by ``notebooks/inspect_rejected.ipynb`` (which stays thin:
the logic lives here and is unit-tested). Names are imported on first use, so importing
``curate.cli.report`` for the command line does not load polars or matplotlib.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "RunTables": "curate.stages.report.tables",
    "counts_by_stage_rule_dataset": "curate.stages.report.tables",
    "dataset_roots": "curate.stages.report.tables",
    "load_run_tables": "curate.stages.report.tables",
    "rejected_samples": "curate.stages.report.tables",
    "status_counts": "curate.stages.report.tables",
    "cards_html": "curate.stages.report.html",
    "sample_card_html": "curate.stages.report.html",
    "thumbnail_data_uri": "curate.stages.report.html",
    "plot_counts": "curate.stages.report.plots",
    "plot_distributions": "curate.stages.report.plots",
    "plot_score_histograms": "curate.stages.report.plots",
    "show": "curate.stages.report.plots",
    "write_report": "curate.stages.report.write",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'curate.stages.report' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
