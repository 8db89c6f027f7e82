"""Exception classes of the method, in a leaf module (it imports nothing of the project).

Every class a user can fix by changing input derives from ``ValueError``, so callers (the CLI,
notebooks) can tell bad input from bugs without importing the module that raised it. The
modules that raise them re-export them under their old names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = [
    "CONFIG_SECTIONS",
    "AssetError",
    "CheckpointError",
    "CheckpointMismatchError",
    "DatasetError",
    "DivergenceError",
    "ExportError",
    "ModelError",
    "QuantizationError",
    "UnknownModelError",
    "first_line",
    "format_validation_error",
]

_MAX_LISTED = 8


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): for one-line errors.

    A pydantic ``ValidationError`` (whose first line, "1 validation error for QuantConfig", names
    no key) is :func:`format_validation_error`'s line instead.
    """
    if _is_pydantic_validation_error(exc):
        return format_validation_error(exc)
    text = str(exc).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__


#: Where a run config (``pipeline.config.RunConfig``) holds each config class: the prefix of its keys
#: in messages (``quant.w_bits``). A class not listed (the run config itself) gets no prefix.
CONFIG_SECTIONS = {
    "ModelConfig": "model",
    "QuantConfig": "quant",
    "ReconstructConfig": "quant.reconstruct",
    "SynthConfig": "generate",
    "DistillConfig": "distill",
    "EvalConfig": "eval",
    "StorageConfig": "storage",
    "RayConfig": "ray",
    "TuneConfig": "tune",
}

_MAX_SHOWN = 60


def _is_pydantic_validation_error(exc: BaseException) -> bool:
    return type(exc).__name__ == "ValidationError" and type(exc).__module__.startswith("pydantic")


def _shown(value: Any) -> str:
    """A value as the user typed it (strings quoted), cut to a readable length."""
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + "..."


def _key(prefix: str, loc: Iterable[Any]) -> str:
    """``prefix`` + a pydantic location as the dotted key a user writes (list positions as ``[i]``)."""
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _bound(value: Any) -> str:
    """A range bound as written in a config (``0``, not ``0.0``)."""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _problem(err: Mapping[str, Any]) -> str:
    """What is wrong with one value, with the allowed range where there is one."""
    kind, ctx, msg = err.get("type"), err.get("ctx") or {}, str(err.get("msg", ""))
    value = _shown(err.get("input"))
    if kind == "less_than_equal":
        return f"{value} is above the maximum {_bound(ctx['le'])}"
    if kind == "greater_than_equal":
        return f"{value} is below the minimum {_bound(ctx['ge'])}"
    if kind == "less_than":
        return f"{value} is too large: it must be less than {_bound(ctx['lt'])}"
    if kind == "greater_than":
        return f"{value} is too small: it must be greater than {_bound(ctx['gt'])}"
    if kind == "literal_error":
        return f"{value} is not one of {ctx['expected']}"
    if kind == "value_error":
        return msg.removeprefix("Value error, ")
    if kind == "missing":
        position = (err.get("loc") or ("",))[-1]
        return "a value is required" + (f" ({value} has too few values)" if isinstance(position, int) else "")
    return f"{value} is not valid: {msg[:1].lower()}{msg[1:]}"


def format_validation_error(
    exc: Any,
    *,
    prefix: str | None = None,
    names: Mapping[str, str] | None = None,
    unknown_key: Callable[[tuple[Any, ...]], str] | None = None,
) -> str:
    """A pydantic ``ValidationError`` as ONE line: ``key: problem`` per error, ``; `` between them.

    ``quant.w_bits: 9 is above the maximum 8``. ``prefix`` is the section of the keys (default:
    :data:`CONFIG_SECTIONS` of the failing class); ``names`` renames keys (a command-line option
    that stands for one: ``{"limit": "--calib-images"}``); ``unknown_key(loc)`` words an unknown
    key (default: "unknown key"). Every place that shows a validation error uses this.
    """
    if prefix is None:
        prefix = CONFIG_SECTIONS.get(str(getattr(exc, "title", "")), "")
    parts = []
    for err in exc.errors():
        loc = tuple(p for p in err.get("loc", ()) if p != "__root__")
        key = _key(prefix, loc)
        key = (names or {}).get(key, key)
        if err.get("type") == "extra_forbidden":
            problem = unknown_key(loc) if unknown_key is not None else "unknown key"
        else:
            problem = _problem(err)
        if key and problem.startswith((f"{key}.", f"{key}=", f"{key} ")):  # a validator's message names it
            key = ""
        parts.append(f"{key}: {problem}" if key else problem)
    return " ".join("; ".join(parts).split())


class AssetError(ValueError):
    """An asset name or path could not be resolved to a verified local file."""


class ExportError(ValueError):
    """The model cannot be exported, or the exported model does not reproduce it."""


class DatasetError(ValueError):
    """The test set cannot be used (missing, malformed, or classes that do not fit the model)."""


class CheckpointError(ValueError):
    """A checkpoint file could not be read, was refused (it needs unpickling), or holds no usable state_dict.

    ``refused``: the Python objects (``module.name``) a refused file would need to unpickle.
    """

    def __init__(self, message: str, refused: list[str] | None = None) -> None:
        super().__init__(message)
        self.refused = list(refused or [])


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
