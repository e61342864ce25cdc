"""curate: prepare InternVL 2.5-style multimodal SFT data (budget, filter, score, pack; train)."""

__version__ = "0.1.0"
