"""Quantized weight layers: the float conv/linear layers a student quantizes, their fake-quant twins, and why
other layers stay float.

:class:`QuantConv1d` / :class:`QuantConv2d` / :class:`QuantLinear` subclass the float layer and share (not copy)
its parameters, so parameter names and state-dict keys are unchanged; their weight is fake-quantized per output
channel at every forward. A subclass with its own forward, ``Conv3d``, transposed convs and functional
``F.conv2d`` calls stay float (:func:`float_layers` names them). :func:`act_quantizers` and
:func:`weight_quantized_layers` find the quantizers of a built student.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from intraq_core.config import QuantConfig
from intraq_core.quant.act_quantizer import ActFakeQuant
from intraq_core.quant.quantizer import WeightFakeQuant

__all__ = [
    "QUANT_CLASSES",
    "QUANT_LAYER_TYPES",
    "QuantConv1d",
    "QuantConv2d",
    "QuantLinear",
    "act_quantizers",
    "float_layers",
    "quant_base",
    "weight_quantized_layers",
    "weight_quantizer",
]


def _convert(module: nn.Module, cls: type[nn.Module], weight_quant: WeightFakeQuant) -> nn.Module:
    """Re-class ``module`` as ``cls`` sharing its parameters, hyper-parameters and hooks."""
    new = cls.__new__(cls)
    new.__dict__ = {k: (v.copy() if isinstance(v, dict) else v) for k, v in module.__dict__.items()}
    new.weight_quant = weight_quant.to(module.weight.device).train(module.training)
    return new


def weight_quantizer(config: QuantConfig, bits: int, channels: int) -> WeightFakeQuant:
    """The weight quantizer ``config`` asks for, at ``bits``, for a layer of ``channels`` outputs."""
    return (
        WeightFakeQuant(
            bits,
            config.weight_symmetric,
            range_method=config.weight_range,
            lp_norm=config.lp_norm,
            learn_scale=config.learn_weight_scale,
            channels=channels,
        )
        if config.stores_weight_range
        else WeightFakeQuant(bits, config.weight_symmetric)
    )


class _WeightQuantized:
    """Mixin of the quantized layers: a ``weight_quant`` and a ``from_float`` that shares parameters."""

    weight_quant: WeightFakeQuant

    @classmethod
    def from_float(cls, layer: nn.Module, weight_quant: WeightFakeQuant) -> nn.Module:
        """Quantized twin of ``layer`` that shares (not copies) its parameters."""
        return _convert(layer, cls, weight_quant)  # type: ignore[arg-type]


class QuantConv2d(_WeightQuantized, nn.Conv2d):
    """``nn.Conv2d`` whose weight is fake-quantized per output channel at every forward."""

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, self.weight_quant(self.weight), self.bias)


class QuantConv1d(_WeightQuantized, nn.Conv1d):
    """``nn.Conv1d`` whose weight is fake-quantized per output channel at every forward."""

    forward = QuantConv2d.forward


class QuantLinear(_WeightQuantized, nn.Linear):
    """``nn.Linear`` whose weight is fake-quantized per output channel at every forward."""

    def forward(self, input: Tensor) -> Tensor:
        return F.linear(input, self.weight_quant(self.weight), self.bias)


QUANT_CLASSES: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: QuantConv1d,
    nn.Conv2d: QuantConv2d,
    nn.Linear: QuantLinear,
}
QUANT_LAYER_TYPES: tuple[type[nn.Module], ...] = (QuantConv1d, QuantConv2d, QuantLinear)
#: Weight layers this module cannot quantize (named in a warning when the model has them).
_UNSUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
_FUNCTIONAL_LAYERS = {F.conv1d, F.conv2d, F.conv3d, F.linear, torch.conv1d, torch.conv2d, torch.conv3d}


def quant_base(module: nn.Module) -> type[nn.Module] | None:
    """The float base class (Conv1d/Conv2d/Linear) ``module`` is quantized as, None if it cannot be.

    A subclass counts when its forward is the base class's (timm's ``Conv2dSame`` pads in its
    own forward, ``StdConv2d`` standardizes its weight: those are left float, with a warning).
    """
    if isinstance(module, QUANT_LAYER_TYPES):
        return None
    for base in QUANT_CLASSES:
        if isinstance(module, base):
            return base if type(module).forward is base.forward else None
    return None


def _float_reason(module: nn.Module) -> str | None:
    """Why a conv/linear ``module`` stays float, None if it is quantized (or is no such layer)."""
    if isinstance(module, QUANT_LAYER_TYPES):
        return None
    if isinstance(module, tuple(QUANT_CLASSES)) and quant_base(module) is None:
        return f"{type(module).__name__} overrides forward() (only the standard conv/linear forward is quantized)"
    if isinstance(module, _UNSUPPORTED_LAYERS):
        return f"{type(module).__name__} is not supported"
    return None


def float_layers(model: nn.Module, gm: fx.GraphModule, quantized: list[str]) -> list[dict[str, str]]:
    """Conv/linear layers of ``model`` that stay float, and functional conv/linear calls, with why."""
    done = set(quantized)
    rows: list[dict[str, str]] = []
    for name, module in model.named_modules():
        if name in done or any(name.startswith(r["name"] + ".") for r in rows):
            continue
        reason = _float_reason(module)
        if reason is None and isinstance(module, nn.MultiheadAttention):
            reason = "nn.MultiheadAttention: its projections are not quantized"
        elif reason is None and isinstance(module, tuple(QUANT_CLASSES)):
            reason = "not called as a module by the traced forward (its weight is used by other code, or never)"
        if reason is not None:
            rows.append({"name": name, "reason": reason})
    reported = [r["name"] for r in rows]
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _FUNCTIONAL_LAYERS:
            weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
            target = str(weight.target) if isinstance(weight, fx.Node) and weight.op == "get_attr" else node.name
            if any(target == r or target.startswith(r + ".") for r in reported):
                continue
            rows.append({"name": target, "reason": f"functional {node.target.__name__}() call (not a module)"})
    return rows


def act_quantizers(model: nn.Module) -> dict[str, ActFakeQuant]:
    """All activation quantizers of ``model`` by qualified name, in registration order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ActFakeQuant)}


def weight_quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """All layers with a weight quantizer (``QuantConv1d``/``QuantConv2d``/``QuantLinear``) by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QUANT_LAYER_TYPES)}
