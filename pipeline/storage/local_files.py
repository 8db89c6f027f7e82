"""Local files written durably and atomically: what a local run location's writes and its run lock stand on.

A temp file next to the target is written and fsynced, then renamed over it (atomic on POSIX), or
hard-linked to it only if the target does not exist yet (atomic exclusive creation: the lock).
"""

from __future__ import annotations

import os
import uuid

__all__ = ["create_local_exclusive", "durable_temp", "write_local_atomic"]


def durable_temp(path: str, data: bytes) -> str:
    """Write ``data`` to a fresh, fsynced temp file next to ``path``; returns its name."""
    directory = os.path.dirname(path) or "."
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
    try:
        os.makedirs(directory, exist_ok=True)
        try:
            f = open(tmp, "wb")  # noqa: SIM115 - closed by the with below
        except FileNotFoundError:  # another process's write probe removed the empty directory just now
            os.makedirs(directory, exist_ok=True)
            f = open(tmp, "wb")  # noqa: SIM115
        with f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return tmp


def write_local_atomic(path: str, data: bytes) -> None:
    """Write a temp file next to ``path``, then rename it over ``path`` (atomic on POSIX)."""
    tmp = durable_temp(path, data)
    try:
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def create_local_exclusive(path: str, data: bytes) -> bool:
    """Create ``path`` with ``data`` only if it does not exist (atomic, via a hard link)."""
    tmp = durable_temp(path, data)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)
    return True
