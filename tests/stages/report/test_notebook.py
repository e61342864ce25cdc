"""notebooks/inspect_rejected.ipynb executed in a real kernel (nbclient + ipykernel) against
the planted demo run: no errors, the expected counts and figures, a decision recorded."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

from curate.core.folder import RunFolder
from curate.core.status import current_decisions

NOTEBOOK = Path(__file__).resolve().parents[3] / "notebooks" / "inspect_rejected.ipynb"


def _outputs(nb) -> tuple[str, list[dict]]:
    text, outputs = [], []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for o in cell.outputs:
            outputs.append(o)
            if o.output_type == "stream":
                text.append(o.text)
            for mime in ("text/plain", "text/html"):
                if mime in o.get("data", {}):
                    text.append(o["data"][mime])
    return "\n".join(text), outputs


def test_notebook_runs_and_shows_counts_figures_and_records_decisions(
    planted_run, run_copy, monkeypatch
):
    path, ids = planted_run
    run = run_copy(path)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # the review cell, as a user would fill it in
    (review,) = [c for c in nb.cells if "DECISIONS: list[dict] = [" in c.source]
    review.source = review.source.replace(
        "DECISIONS: list[dict] = [",
        f'DECISIONS: list[dict] = [{{"sample_id": "{ids["flagged"][0]}", "decision": "keep", '
        '"note": "from the notebook"},',
    )
    (params,) = [c for c in nb.cells if "CURATE_RUN" in c.source]
    params.source = params.source.replace("RULE = None", 'RULE = "many_rule"')
    monkeypatch.setenv("CURATE_RUN", str(run))  # the kernel inherits the environment
    NotebookClient(
        nb,
        timeout=180,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    ).execute()
    text, outputs = _outputs(nb)
    assert not [o for o in outputs if o.output_type == "error"]
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pngs) == 3  # counts, score histograms, tiles/tokens/pack fill
    assert f"run {run.resolve()}:" in text
    assert "filter/many_rule (flag): 8 samples" in text
    assert "filter/char_run (reject): 1 sample\n" in text
    assert "score/quality_below_threshold (reject): 3 samples" in text
    assert "total keep / reject / flag:" in text
    assert "8 samples match (rule='many_rule'" in text
    htmls = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    cards = [h for h in htmls if 'class="card"' in h]
    assert cards and cards[0].count('class="card"') == 8 and "data:image/jpeg;base64," in cards[0]
    assert "recorded 1 decisions" in text
    decisions = current_decisions(RunFolder(run))
    assert decisions["sample_id"].to_list() == ids["flagged"]
    assert decisions["note"].to_list() == ["from the notebook"]
