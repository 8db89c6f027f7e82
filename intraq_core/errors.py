"""Exception classes of the method, in a leaf module (it imports nothing of the project).

Every class a user can fix by changing input derives from ``ValueError``, so callers (the CLI,
notebooks) can tell bad input from bugs without importing the module that raised it. The
modules that raise them re-export them under their old names.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "AssetError",
    "CheckpointError",
    "CheckpointMismatchError",
    "DatasetError",
    "DivergenceError",
    "ModelError",
    "QuantizationError",
    "UnknownModelError",
    "first_line",
]

_MAX_LISTED = 8


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__


class AssetError(ValueError):
    """An asset name or path could not be resolved to a verified local file."""


class DatasetError(ValueError):
    """The test set cannot be used (missing, malformed, or classes that do not fit the model)."""


class CheckpointError(ValueError):
    """A checkpoint file could not be read, was refused (it needs unpickling), or holds no usable state_dict."""


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = f", ... (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return f"[{shown}{more}]"


class CheckpointMismatchError(CheckpointError):
    """A state_dict does not fit the model; lists missing, unexpected and mis-shaped keys."""

    def __init__(
        self,
        missing: list[str],
        unexpected: list[str],
        mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
        *,
        model_name: str = "model",
        source: str | None = None,
        hints: Iterable[str] = (),
    ) -> None:
        self.missing = missing
        self.unexpected = unexpected
        self.mismatched = mismatched
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) {_listing(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) {_listing(unexpected)}")
        if mismatched:
            shown = [f"{k}: checkpoint {list(a)} vs model {list(b)}" for k, a, b in mismatched]
            parts.append(f"{len(mismatched)} shape mismatch(es) {_listing(shown)}")
        where = f" {source}" if source else ""
        msg = f"checkpoint{where} does not match {model_name}: " + "; ".join(parts)
        hints = list(hints)
        if hints:
            msg += " (hint: " + "; ".join(hints) + ")"
        super().__init__(msg)


class UnknownModelError(ValueError):
    """``model.arch`` names no registered model, importable callable, timm model or checkpoint file."""


class ModelError(ValueError):
    """A model that cannot be used as asked: a callable that returns no ``nn.Module``, a head that
    does not match ``num_classes``, no BatchNorm layer for a method whose loss needs BN statistics."""


class QuantizationError(ValueError):
    """A model cannot be quantized as asked (e.g. activation bits requested but no activation of
    the model feeds a weight layer)."""


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss: the recipe is unstable for this data."""
