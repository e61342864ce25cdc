"""Inspection of a run folder: tables, plots, HTML sample cards, the self-contained report.

Used by ``curate report`` and by ``notebooks/inspect_rejected.ipynb`` (which stays thin:
the logic lives here and is unit-tested). Names are imported on first use, so importing
``curate.inspect.cli`` for the command line does not load polars or matplotlib.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "RunTables": "curate.inspect.tables",
    "counts_by_stage_rule_dataset": "curate.inspect.tables",
    "dataset_roots": "curate.inspect.tables",
    "load_run_tables": "curate.inspect.tables",
    "rejected_samples": "curate.inspect.tables",
    "status_counts": "curate.inspect.tables",
    "cards_html": "curate.inspect.html",
    "sample_card_html": "curate.inspect.html",
    "thumbnail_data_uri": "curate.inspect.html",
    "plot_counts": "curate.inspect.plots",
    "plot_distributions": "curate.inspect.plots",
    "plot_score_histograms": "curate.inspect.plots",
    "show": "curate.inspect.plots",
    "write_report": "curate.inspect.report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'curate.inspect' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
