"""Errors a user can cause and fix: the CLI prints their message in one line, no traceback."""

from __future__ import annotations


class CurateError(ValueError):
    """A foreseeable problem (bad input, missing earlier stage, busy run folder)."""
