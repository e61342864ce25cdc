"""Ingest: InternVL meta JSON + JSONL (or Parquet) annotations into normalised sample rows."""
