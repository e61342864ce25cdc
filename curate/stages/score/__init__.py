"""LLM quality scoring and the LLM repetition check (``curate score``).

- ``prompts``: prompt files by name, rendering a sample into a judge prompt.
- ``labels``: the score labels "0".."10": constrained choice and exact label probabilities.
- ``engines``: vLLM offline, or an OpenAI-compatible server; same requests, same results.
- ``stage``: the stage over a run folder (``scores/``, ``ledger/score``), resumable per sample.

Nothing heavy is imported here: vLLM and transformers load when an engine is made.
"""
