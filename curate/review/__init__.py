"""Review of flagged and rejected samples: one decision module, two faces.

- ``decisions``: what a decision is and how it is recorded (validated, under the run lock,
  atomically, to ``RUN/review/decisions.parquet``); ``curate review --sample/--rule`` and the
  web app both call it.
- ``data``, ``app``, ``serve``: ``curate review --serve``, a local web app for fast keyboard
  review (the queue, a sample view, keep / reject / undo), rendered with the same jinja2 card
  template as the static ``curate report``.

The package reads the run through ``curate.core`` and the report's read-only helpers; stages
never import it.
"""
