"""How this process's C allocator treats large freed CPU tensors: keep them for reuse.

PyTorch's CPU tensors come from the C library's ``malloc``. glibc serves every request above its
mmap threshold (at most 32 MiB, whatever it learns) with a fresh ``mmap`` and unmaps it on
``free``, so each such tensor costs one page fault per 4 KiB page when first written, every time
it is allocated. At 224x224 most activations of a synthesis batch are above 32 MiB (MobileNetV1
x0.25 at batch 64: 12-100 MiB each, allocated a dozen times per layer and iteration): the faults,
not the arithmetic, were most of the loop (``benchmarks/results/gen_speed.md``, "The allocator").

:func:`reuse_freed_memory` makes glibc keep freed memory in its heap and serve large requests
from it (no mmap, no trimming, one arena for all threads, so Ray's threaded actors use it too).
The arithmetic is unchanged, so are the results: only where the memory comes from changes. The
cost: the process keeps the memory of its peak until it exits instead of returning freed large
blocks to the system (its peak is the same). The pipeline sets it in every process that opens a
run (``cpu_allocator: reuse``, the default); library users call it once::

    >>> from intraq_core.memory import reuse_freed_memory
    >>> reuse_freed_memory()  # doctest: +SKIP
    True

Other C libraries (musl, macOS, Windows) are left as they are; the call then returns False.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform

__all__ = ["reuse_freed_memory"]

# mallopt(3) parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

_NEVER_TRIM = -1  # M_TRIM_THRESHOLD -1: glibc never returns the heap's free top to the system (mallopt(3))


@functools.cache
def _mallopt() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    fn = getattr(libc, "mallopt", None)
    if fn is not None:
        fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return fn


def reuse_freed_memory() -> bool:
    """Make glibc's malloc keep freed large blocks for reuse, process-wide, from now on.

    Returns whether the C library took the settings (False: not glibc, nothing done). Call it
    before the work starts: threads that already own an arena keep theirs. Idempotent.
    """
    mallopt = _mallopt()
    if mallopt is None:
        return False
    settings = [(_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER_TRIM)]
    return all(mallopt(param, value) == 1 for param, value in settings)
