"""Benchmark decontamination: training samples whose images or user turns contain an item of
an evaluation set on disk are rejected as ``benchmark_contamination`` (pipeline section
``decontaminate:``; its engine step ``decontaminate`` runs per shard after ``signatures``)."""
