"""Packing: samples into packs of at most C tokens and K tiles."""
