"""Demo data and tiny local models (nothing can be downloaded: everything is built here)."""
