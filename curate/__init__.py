"""curate: prepare InternVL 2.5-style multimodal SFT data (budget, filter, score, pack) and train on it."""

__version__ = "0.1.0"
