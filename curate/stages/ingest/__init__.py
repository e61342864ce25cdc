"""Ingest: InternVL meta JSON + JSONL (or .json array, or Parquet) annotations into normalised
sample rows."""
