"""The pipeline's exception classes and the helpers that keep their messages on one line.

A leaf module: it imports nothing of the project, so every layer (storage, stages, executors,
the CLI's :mod:`pipeline.cli.explain`) can name these classes without importing the modules
that raise them. Every class a user can fix by changing input derives from ``ValueError``; the
method's own classes live in :mod:`intraq_core.errors`.
"""

from __future__ import annotations

__all__ = [
    "BadDatasetError",
    "ClusterAuthError",
    "GenerationError",
    "InputError",
    "LockedError",
    "RunExistsError",
    "StorageError",
    "UsageError",
    "exception_chain",
    "one_line",
]

_MAX_CHAIN = 16


class InputError(ValueError):
    """Bad input found before any work started (the run location is left untouched)."""


class UsageError(ValueError):
    """Bad command-line input (an option's value)."""


class StorageError(ValueError):
    """A storage location cannot be used: bad URL, credentials, endpoint or permissions."""


class LockedError(StorageError):
    """The run location is locked by another live run."""


class RunExistsError(StorageError):
    """The location already holds a run and neither --resume nor --overwrite was given."""


class BadDatasetError(ValueError):
    """Shards of the synthetic dataset failed validation; ``shards`` lists their indices."""

    def __init__(self, message: str, shards: list[int]) -> None:
        super().__init__(message)
        self.shards = shards


class GenerationError(RuntimeError):
    """Generation could not complete (e.g. the storage holds another run's dataset)."""


class ClusterAuthError(RuntimeError):
    """Token authentication is required but cannot be satisfied; the message is one line."""


def exception_chain(exc: BaseException, limit: int = _MAX_CHAIN) -> list[BaseException]:
    """The exception, its causes and contexts (also suppressed ones), at most ``limit``, without repeats."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen and len(seen) < limit:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def one_line(text: object, limit: int = 600) -> str:
    """``text`` with its whitespace collapsed so it stays on one line, capped at ``limit`` characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
