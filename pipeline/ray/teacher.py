"""The teacher through the object store: built once by the driver, received whole by every actor and Train worker.

:func:`share_teacher` puts the driver's :class:`~pipeline.context.BuiltTeacher` (the module, its resolved
model config, its weights' checksum) in Ray's object store, which keeps one copy per node; Ray
hands it to each generation actor and Train worker (:func:`received_teacher`) for its
:class:`~pipeline.context.RunContext` instead of resolving the config, reading the weights file,
building the network and checksumming it again, so its start-up is shorter and its node needs no
weights file. The checksum the driver computed is then the only one: nothing can differ.

A teacher that cannot be pickled (a user model holding a lock or an open file, say) is not shared:
each process then builds its own from the config, as without this module, and Train workers
check its checksum against the driver's.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from pipeline.context import BuiltTeacher, RunContext
from pipeline.errors import one_line

__all__ = ["received_teacher", "share_teacher"]

log = logging.getLogger(__name__)


def share_teacher(ctx: RunContext, model: nn.Module | None = None) -> Any | None:
    """An object reference to ``ctx``'s teacher (``model``, a :meth:`RunContext.teacher` of it, or a fresh
    one), serialized now (later changes to the module are not shared); None when it cannot be
    serialized (every process then builds its own)."""
    import ray
    from ray import cloudpickle

    built = ctx.built_teacher(model)
    try:  # serialized once here to learn whether it can be, before (and without) touching Ray
        cloudpickle.dumps(built)
    except Exception as exc:  # what a module may raise when pickled is open-ended
        log.warning(
            "the teacher cannot be pickled (%s): every Ray actor and Train worker builds its own", one_line(exc)
        )
        return None
    return ray.put(built)


def received_teacher(built: Any) -> BuiltTeacher | None:
    """The :class:`BuiltTeacher` of a :func:`share_teacher` reference, as Ray hands it to a task or actor
    (Ray deserializes it, as every actor argument: nothing here unpickles)."""
    if built is None:
        return None
    if not isinstance(built, BuiltTeacher):
        raise TypeError(f"expected a shared teacher, got {type(built).__name__}")
    return built
