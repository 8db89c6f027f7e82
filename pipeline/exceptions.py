"""Exception classes the CLI explains, in a leaf module (it imports nothing of the project).

:mod:`pipeline.errors` decides which failures get a one-line message; it needs these classes
without importing the stages that raise them (generation, clusters), so they live here and the
raising modules re-export them under their old names.
"""

from __future__ import annotations

__all__ = ["ClusterAuthError", "GenerationError", "InputError", "UsageError"]


class InputError(ValueError):
    """Bad input found before any work started (the run location is left untouched)."""


class UsageError(ValueError):
    """Bad command-line input (an option's value)."""


class GenerationError(RuntimeError):
    """Generation could not complete (e.g. the storage holds another run's dataset)."""


class ClusterAuthError(RuntimeError):
    """Token authentication is required but cannot be satisfied; the message is one line."""
