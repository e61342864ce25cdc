"""Rule filters and repetition detectors (the paper's heuristic rules and repetition checks).

- ``registry``: the rules (metric, comparison, default threshold, severity reject | flag).
- ``config``: ``FilterConfig``, thresholds with per-dataset and per-domain overrides.
- ``repetition``: the peers' repetition formulas (data-juicer, datatrove's Gopher, InternVL)
  and conversation-aware detectors (per answer, repeated answers, tail loops).
- ``text``, ``images``, ``dedup``: answer statistics, image anomalies, exact duplicates.
- ``rules``: measure a batch of samples and judge them (every failed rule, with reasons).
- ``stage``: ``run_filter`` over a run folder; ``cli``: ``curate filter``.
"""
