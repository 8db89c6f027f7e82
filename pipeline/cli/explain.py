"""Which failures the CLI explains in one line (exit code 2), and how.

A failure is *explained* when its root cause, after unwrapping Ray's wrappers, is bad input or
a bad environment the user can fix: a ValueError (config, storage, shards, checkpoints, test
sets, cluster YAML — every project error class derives from it), a missing or unreadable file,
a generation that cannot proceed, a diverged recipe, Ray token authentication, or a storage
failure from a library outside :class:`pipeline.storage.store.Storage` (botocore, pyarrow's S3 client).
Anything else is a bug and keeps its traceback.

Ray wraps errors raised in tasks, actors and Train workers: ``RayTaskError`` (``.cause``),
``WorkerGroupError`` (``.worker_failures``, by rank), ``ControllerError``
(``.controller_failure``). :func:`root_cause` unwraps them, so a ValueError raised inside a
worker reads like one raised here. An actor whose ``__init__`` raised arrives as a
``GenerationError`` naming the original exception (the object itself does not survive Ray).

This module imports nothing heavy (no torch, no Ray) and none of the stages: the exception
classes it recognizes live in the leaf modules :mod:`pipeline.errors` and
:mod:`intraq_core.errors`.
"""

from __future__ import annotations

from intraq_core.errors import DivergenceError, first_line
from pipeline.errors import ClusterAuthError, GenerationError
from pipeline.storage.failures import explain_storage_failure, redact

__all__ = ["explain", "root_cause"]

_MAX_DEPTH = 16


def _ray_inner(exc: BaseException) -> BaseException | None:
    """The exception a Ray wrapper carries, or None when ``exc`` is not a Ray wrapper."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    if "RayTaskError" in names:
        cause = getattr(exc, "cause", None)
        return cause if isinstance(cause, BaseException) else None
    if "WorkerGroupError" in names:
        failures = getattr(exc, "worker_failures", None) or {}
        for rank in sorted(failures):
            if isinstance(failures[rank], BaseException):
                return failures[rank]
        return None
    if "ControllerError" in names:
        inner = getattr(exc, "controller_failure", None)
        return inner if isinstance(inner, BaseException) else None
    return None


def root_cause(exc: BaseException) -> BaseException:
    """``exc`` with Ray's wrappers (task, Train worker group, Train controller) removed."""
    current = exc
    for _ in range(_MAX_DEPTH):
        inner = _ray_inner(current)
        if inner is None or inner is current:
            break
        current = inner
    return current


_EXPLAINED_TYPES: tuple[type[BaseException], ...] = (
    ValueError,  # ConfigError, StorageError, ShardError, CheckpointError, DatasetError, ModelError, ...
    FileNotFoundError,
    PermissionError,
    NotADirectoryError,
    IsADirectoryError,
    GenerationError,
    DivergenceError,
    ClusterAuthError,
)


def explain(exc: BaseException) -> str | None:
    """The one-line message for an explained failure, or None when ``exc`` is unexpected (a bug).

    The message is redacted (no secret values) and has no line breaks.
    """
    root = root_cause(exc)
    cannot_reach_ray = isinstance(root, ConnectionError) and "ray" in str(root).lower()
    if not (isinstance(root, _EXPLAINED_TYPES) or cannot_reach_ray):
        return explain_storage_failure(root)  # None: not a storage failure either
    # A refused checkpoint says what it needs itself (intraq_core.torchfile.safe_load).
    return redact(" ".join(first_line(root).split()))
