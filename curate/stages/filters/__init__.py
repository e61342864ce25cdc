"""Rule filters and repetition detectors (the paper's heuristic rules and repetition checks).

- ``registry``: the rules (metric, comparison, default threshold, severity reject | flag) and
  built-in thresholds per domain.
- ``config``: ``FilterConfig``, thresholds with per-dataset and per-domain overrides.
- ``layout``: an answer's content apart from its layout (separators, table borders, prefixes,
  indentation, fences, LaTeX commands), what repetition is measured on.
- ``repetition``: the peers' repetition formulas (data-juicer, datatrove's Gopher, InternVL),
  the same on content, and repeated answers; ``loops``: tail loops and counting loops.
- ``text``, ``images``, ``dedup``: answer statistics, image anomalies (each image decoded once
  per run), exact duplicates.
- ``rules``: measure a batch of samples and judge them (every failed rule, with reasons).
- ``stage``: ``run_filter`` over a run folder; ``cli``: ``curate filter``.
"""
