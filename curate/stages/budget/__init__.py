"""Budget: exact InternVL tiling, per-sample tile and token costs, repeat factors, mixtures."""
