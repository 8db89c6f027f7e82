"""Models with several outputs: ``model.output`` picks the logits out of a tuple, list or dict.

Some classifiers return more than their logits, e.g. ``(logits, features)`` or
``{"logits": ..., "aux": ...}``. Everything in the project (synthesis, quantization, distillation,
evaluation, export) expects a forward that returns the ``[N, num_classes]`` logits, so
:func:`~intraq_core.models.registry.create_model` wraps such a model in :class:`SelectOutput`
when ``model.output`` is set: an index for a tuple/list, a key for a dict.

The wrapper is traceable by ``torch.fx`` (the selection happens on the Python container of the
traced values, or as a ``getitem`` node), and its weights are those of the wrapped model under
the prefix ``model.``: a user's weights file is loaded into the wrapped model before wrapping, and
checkpoints written by the project (students, float models) are rebuilt the same way, so they
reload as written.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from intraq_core.errors import ModelError

__all__ = ["SelectOutput", "describe_output", "select_output", "suggest_output"]

_MAX_ELEMENTS = 6


def _describe_value(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"Tensor{list(value.shape)}"
    return type(value).__name__


def describe_output(out: Any) -> str:
    """A short description of what a forward returned, e.g. ``tuple (Tensor[2, 10], Tensor[2, 64])``."""
    if isinstance(out, Tensor):
        return f"{_describe_value(out)} ({str(out.dtype).removeprefix('torch.')})"
    if isinstance(out, Mapping):
        items = [f"{k!r}: {_describe_value(v)}" for k, v in list(out.items())[:_MAX_ELEMENTS]]
        more = ", ..." if len(out) > _MAX_ELEMENTS else ""
        return f"{type(out).__name__} {{{', '.join(items)}{more}}}"
    if isinstance(out, (tuple, list)):
        items = [_describe_value(v) for v in out[:_MAX_ELEMENTS]]
        more = ", ..." if len(out) > _MAX_ELEMENTS else ""
        return f"{type(out).__name__} ({', '.join(items)}{more})"
    return type(out).__name__


def suggest_output(out: tuple[Any, ...] | list[Any] | Mapping[Any, Any], batch: int, num_classes: int) -> int | str:
    """The index/key of the first element shaped like logits ``[batch, num_classes]`` (else the first one)."""
    items = list(out.items()) if isinstance(out, Mapping) else list(enumerate(out))
    for key, value in items:
        if isinstance(value, Tensor) and tuple(value.shape) == (batch, num_classes):
            return key
    return items[0][0] if items else 0


def select_output(out: Any, output: int | str) -> Any:
    """Element ``output`` of a forward's tuple/list/dict ``out``; ModelError when it has none.

    While ``torch.fx`` traces, ``out`` is a Python container of traced values (indexed here, at
    trace time) or a single traced value standing for one (indexed in the graph).
    """
    if isinstance(out, Tensor):
        raise ModelError(
            f"model.output={output!r} is set, but the model returns a single {describe_output(out)}: "
            "remove model.output (it is only for models that return a tuple, list or dict)"
        )
    if isinstance(out, Mapping):
        if output not in out:
            raise ModelError(
                f"model.output={output!r} is not a key of the {describe_output(out)} the model returns; "
                "set model.output to the key of the logits"
            )
    elif isinstance(out, (tuple, list)):
        if not isinstance(output, int) or not -len(out) <= output < len(out):
            raise ModelError(
                f"model.output={output!r} is not an index of the {describe_output(out)} the model returns; "
                f"set model.output to the index of the logits (0 to {len(out) - 1})"
            )
    elif not hasattr(out, "__getitem__"):
        raise ModelError(f"model.output={output!r} is set, but the model returns a {describe_output(out)}")
    return out[output]


class SelectOutput(nn.Module):
    """``model`` whose forward returns element ``output`` of what ``model`` returns (its logits).

    The wrapped model is the submodule ``model`` (so its weights are ``model.<name>``).
    """

    def __init__(self, model: nn.Module, output: int | str) -> None:
        super().__init__()
        self.model = model
        self.output = output

    def forward(self, x: Tensor) -> Tensor:
        return select_output(self.model(x), self.output)

    def extra_repr(self) -> str:
        return f"output={self.output!r}"
