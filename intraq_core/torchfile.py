"""Reading a torch file safely: :func:`safe_load`, the only way the project reads one.

``torch.load(..., weights_only=True)``, because unpickling arbitrary objects can execute code and
a state_dict never needs it. A refused file raises :class:`~intraq_core.errors.CheckpointError`
naming the refused global; an unreadable one says what it is (empty, text, truncated zip, ...).
:func:`load_resume_state` reads a resume point that can be redone (a training checkpoint, a
generator's state): a dict tagged with its format, or None with a warning.
A leaf module: it imports torch and :mod:`intraq_core.errors`, nothing else of the project.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import zipfile
from pathlib import Path
from typing import IO, Any

import torch

from intraq_core.errors import CheckpointError, first_line

__all__ = ["Source", "describe_unreadable", "load_resume_state", "safe_load"]

log = logging.getLogger(__name__)

Source = str | os.PathLike[str] | bytes | IO[bytes]


def _unpickler_detail(message: str) -> str:
    """The informative line of torch's long weights-only error (e.g. 'Unsupported operand 60')."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    for i, line in enumerate(lines):
        if "WeightsUnpickler error:" in line:
            rest = line.split("WeightsUnpickler error:", 1)[1].strip()
            return rest or (lines[i + 1] if i + 1 < len(lines) else "invalid pickle")
    return lines[0] if lines else "invalid pickle"


def _refused_globals(source: Any) -> list[str]:
    """The Python objects (``module.name``) a torch file needs unpickled that ``weights_only`` refuses,
    as torch itself reads them (:func:`torch.serialization.get_unsafe_globals_in_checkpoint`); [] where
    it cannot tell (not a zip checkpoint, a stream that cannot seek)."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(source))
    except Exception:  # not a checkpoint it can disassemble: the caller describes the file instead
        return []


#: The pickled magic number that opens a torch file of the legacy (pre-1.6, non-zip) format.
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
_HEAD_BYTES = 4096


def _read_head(source: Any) -> tuple[bytes, int | None, bool | None, list[str]]:
    """The first bytes of a checkpoint source, its size, whether it is a complete zip archive and the
    names inside it (None/[] where unknown, e.g. a stream that cannot seek)."""
    try:
        if isinstance(source, (str, os.PathLike)):
            with open(source, "rb") as f:
                head = f.read(_HEAD_BYTES)
            size: int | None = os.path.getsize(source)
            target: Any = source
        elif isinstance(source, bytes):
            head, size, target = source[:_HEAD_BYTES], len(source), io.BytesIO(source)
        elif isinstance(source, io.IOBase) and source.seekable():
            start = source.tell()
            head = source.read(_HEAD_BYTES)
            source.seek(0, os.SEEK_END)
            size = source.tell() - start
            source.seek(start)
            target = source
        else:
            return b"", None, None, []
        if not head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
            return head, size, False, []
        try:
            with zipfile.ZipFile(target) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, ValueError):
            return head, size, False, []
        finally:
            if not isinstance(source, (str, os.PathLike, bytes)):
                source.seek(start)
        return head, size, True, names
    except OSError:
        return b"", None, None, []


def _looks_like_text(head: bytes) -> str | None:
    """The first line of ``head`` when it is text (UTF-8, no NUL, printable), else None."""
    if not head or b"\x00" in head:
        return None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # not just a character cut at the end of the head
            return None
        text = head[: exc.start].decode("utf-8")
    if any(not (c.isprintable() or c in "\t\r\n\f") for c in text):
        return None
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def describe_unreadable(source: Any, detail: str = "") -> str:
    """What a file that ``torch.load`` cannot read is, in words: an empty file, a text file (an HTML
    page, a Git LFS pointer), a truncated zip, a zip that is not a checkpoint, a plain Python
    pickle, a NumPy or safetensors file. ``detail`` (torch's own message) is kept only where the file
    looks like a torch checkpoint that is damaged inside."""
    head, size, complete_zip, names = _read_head(source)
    if size == 0:
        return "it is an empty file (0 bytes): it was probably never written, or cut off while saving or copying"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")) and complete_zip is False:
        return (
            f"it is a truncated or damaged zip archive ({size} bytes; torch.save writes a zip archive): it was "
            "probably cut off while saving, downloading or copying"
        )
    if complete_zip:
        if not any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
            shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            return f"it is a zip archive but not a torch checkpoint (no data.pkl inside; it holds {shown or 'nothing'})"
        return f"it is a damaged torch checkpoint ({detail or 'unreadable'})"
    if head.startswith(_LEGACY_TORCH_MAGIC):
        return f"it is a damaged torch checkpoint of the legacy (pre-1.6) format ({detail or 'unreadable'})"
    if head.startswith(b"\x93NUMPY"):
        return "it is a NumPy .npy array file, not a torch checkpoint"
    if len(head) >= 10 and head[8:9] == b"{" and size is not None and int.from_bytes(head[:8], "little") < size:
        return (
            "it is a safetensors file, not a torch checkpoint; convert it: "
            "torch.save(safetensors.torch.load_file(path), 'weights.pt')"
        )
    text = _looks_like_text(head)
    if text is not None:
        lowered = text.lower()
        if lowered.startswith("version https://git-lfs"):
            return "it is a Git LFS pointer file, not the weights themselves (fetch them: git lfs pull)"
        if lowered.startswith(("<!doctype html", "<html")):
            return "it is an HTML page, not a torch checkpoint (a download that saved an error or login page?)"
        shown = text if len(text) <= 40 else text[:37] + "..."
        return f"it is a text file, not a torch checkpoint (it starts with {shown!r})"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "it is a plain Python pickle, not a file written by torch.save"
    if not head:
        return f"it is not a torch checkpoint ({detail or 'unreadable'})"
    return f"it is not a torch checkpoint (unrecognized binary content starting with {head[:8].hex(' ')})"


def safe_load(source: Source, *, mmap: bool = False, what: str | None = None) -> Any:
    """Read a torch file with ``torch.load(weights_only=True)`` onto the CPU.

    ``source`` is a path, the file's bytes or a binary file object; ``what`` names it in
    messages (default: the path, or "checkpoint"). Every failure is a :class:`CheckpointError`
    with one informative line: a missing file, what an unreadable one is (:func:`describe_unreadable`:
    an empty file, a text file, a truncated zip, ...), or a refusal that names the global the file
    would need to unpickle (:func:`_refused_globals`, e.g. ``posix.system``), also in
    :attr:`CheckpointError.refused <intraq_core.errors.CheckpointError>`.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        name = what or str(path)
        if not path.is_file():
            raise CheckpointError(f"file not found: {path}")
        target: Any = path
        mmap = mmap and zipfile.is_zipfile(path)
    else:
        name = what or "checkpoint"
        target = io.BytesIO(source) if isinstance(source, bytes) else source
        mmap = False
    start = target.tell() if isinstance(target, io.IOBase) and target.seekable() else None

    try:
        return torch.load(target, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        readable_again = isinstance(target, Path) or start is not None
        if start is not None:
            target.seek(start)
        refused = _refused_globals(target) if readable_again else []
        if refused:
            raise CheckpointError(
                f"refused to load {name}: it is not loadable with torch.load(weights_only=True) (it needs the "
                f"Python object{'s' if len(refused) > 1 else ''} {', '.join(refused)}); only plain "
                "tensors/containers are accepted because unpickling arbitrary objects can execute code. "
                "Re-save it as {'state_dict': model.state_dict()} from a trusted environment.",
                refused=refused,
            ) from None
        detail = _unpickler_detail(str(exc))
    except Exception as exc:
        detail = " ".join(str(exc).split()).split(". ")[0] or type(exc).__name__
    # Corrupt, or not a torch file at all. Raised outside the handler, so torch's message (for a text
    # file: "Weights only load failed ... Unsupported operand") is no context to mistake for a refusal.
    if start is not None:
        target.seek(start)
    raise CheckpointError(f"could not read {name} as a torch checkpoint: {describe_unreadable(target, detail)}")


def load_resume_state(source: Source, tag: str, *, what: str, kind: str) -> dict[str, Any] | None:
    """The dict a resume point holds when its ``"format"`` is ``tag``, else None with a warning.

    For files a run may ignore and redo (a training checkpoint, a generator's state): an unreadable
    file (:func:`safe_load` fails) or one of another format is not an error but a warning naming
    ``what`` (where the file is) and ``kind`` (what it should have been), and the caller starts over.
    """
    try:
        state = safe_load(source, what=what)
    except CheckpointError as exc:
        log.warning("ignoring unreadable %s %s: %s", kind, what, first_line(exc))
        return None
    if not isinstance(state, dict) or state.get("format") != tag:
        log.warning("ignoring %s: not a %s (format %r)", what, kind, tag)
        return None
    return state
