"""Generic access to a classifier's BatchNorm layers, activation sites and features (no hard-coded names).

BNS needs every BN layer; MDC needs the penultimate feature, i.e. the input of the
classifier, found as the last ``nn.Linear`` executed in a forward pass. This works for the
CIFAR ResNets (``linear``), torchvision ResNets (``fc``), MobileNetV2 (``classifier.1``)
and any model whose head is an ``nn.Linear``. The quantizer asks :func:`activation_site` what a
traced graph node computes: a call of an activation function (ReLU, LeakyReLU, PReLU, ELU,
SiLU, GELU, Mish, hardswish, sigmoid, ...), as a module or a functional call, and whether its
output can be negative.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.hooks import RemovableHandle

__all__ = ["ActivationSite", "FeatureTap", "activation_site", "bn_layers", "classifier_layer", "flatten_feature"]

PENULTIMATE = "penultimate"

#: Activations whose output is never negative (an unsigned quantization grid fits them).
NON_NEGATIVE = frozenset({"relu", "relu6", "sigmoid", "hardsigmoid", "softplus", "softmax"})
#: Activation modules by type (subclasses match too; the first match in this order wins, so
#: ReLU6 is found before its base class Hardtanh).
_ACT_MODULES: dict[type[nn.Module], str] = {
    nn.ReLU: "relu",
    nn.ReLU6: "relu6",
    nn.LeakyReLU: "leaky_relu",
    nn.PReLU: "prelu",
    nn.RReLU: "rrelu",
    nn.ELU: "elu",
    nn.SELU: "selu",
    nn.CELU: "celu",
    nn.SiLU: "silu",
    nn.GELU: "gelu",
    nn.Mish: "mish",
    nn.Hardswish: "hardswish",
    nn.Hardsigmoid: "hardsigmoid",
    nn.Sigmoid: "sigmoid",
    nn.Tanh: "tanh",
    nn.Softplus: "softplus",
    nn.Hardtanh: "hardtanh",
    nn.Softsign: "softsign",
    nn.Softmax: "softmax",
}
_ACT_FUNCTIONS: dict[Callable[..., Tensor], str] = {
    F.relu: "relu",
    F.relu_: "relu",
    torch.relu: "relu",
    torch.relu_: "relu",
    F.relu6: "relu6",
    F.leaky_relu: "leaky_relu",
    F.leaky_relu_: "leaky_relu",
    F.prelu: "prelu",
    F.rrelu: "rrelu",
    F.elu: "elu",
    F.elu_: "elu",
    F.selu: "selu",
    F.celu: "celu",
    F.silu: "silu",
    F.gelu: "gelu",
    F.mish: "mish",
    F.hardswish: "hardswish",
    F.hardsigmoid: "hardsigmoid",
    F.sigmoid: "sigmoid",
    torch.sigmoid: "sigmoid",
    F.tanh: "tanh",
    torch.tanh: "tanh",
    F.softplus: "softplus",
    F.hardtanh: "hardtanh",
    F.hardtanh_: "hardtanh",
    F.softsign: "softsign",
    F.softmax: "softmax",
    torch.softmax: "softmax",
}
_ACT_METHODS = {
    "relu": "relu",
    "relu_": "relu",
    "sigmoid": "sigmoid",
    "sigmoid_": "sigmoid",
    "tanh": "tanh",
    "tanh_": "tanh",
    "softmax": "softmax",
}


@dataclass(frozen=True)
class ActivationSite:
    """One call of an activation in a traced graph: which one, and whether its output can be negative.

    ``signed`` is False where the output is provably non-negative (ReLU, ReLU6, sigmoid,
    hardsigmoid, softplus, softmax, a hardtanh whose lower bound is >= 0) and True for the
    others (LeakyReLU, PReLU, ELU, SiLU, GELU, Mish, hardswish, tanh, ...), whose outputs go
    below zero and need a grid with negative levels.
    """

    kind: str
    signed: bool


def activation_site(node: fx.Node, gm: fx.GraphModule) -> ActivationSite | None:
    """The activation ``node`` calls (a module, a function or a tensor method), None if it is none.

    Modules match by type, including subclasses (a user's ``class MyReLU(nn.ReLU)``).
    """
    kind: str | None = None
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        kind = next((k for cls, k in _ACT_MODULES.items() if isinstance(module, cls)), None)
    elif node.op == "call_function":
        kind = _ACT_FUNCTIONS.get(node.target)  # type: ignore[arg-type]
    elif node.op == "call_method":
        kind = _ACT_METHODS.get(str(node.target))
    if kind is None:
        return None
    signed = kind not in NON_NEGATIVE
    if kind == "hardtanh":
        signed = _hardtanh_min(node, gm) < 0
    return ActivationSite(kind, signed)


def _hardtanh_min(node: fx.Node, gm: fx.GraphModule) -> float:
    """The lower clamp of a hardtanh call (module attribute or ``min_val`` argument)."""
    if node.op == "call_module":
        return float(getattr(gm.get_submodule(str(node.target)), "min_val", -1.0))
    value = node.kwargs.get("min_val", node.args[1] if len(node.args) > 1 else -1.0)
    return float(value) if isinstance(value, (int, float)) else -1.0


def bn_layers(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """All BatchNorm layers of ``model`` with their names, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _BatchNorm)]


def classifier_layer(model: nn.Module, example_input: Tensor) -> tuple[str, nn.Linear]:
    """Name and module of the last ``nn.Linear`` executed on ``example_input``.

    Runs one forward pass without gradients and in eval mode (BN statistics untouched);
    the model's training flags are restored afterwards.
    """
    executed: list[str] = []
    handles = [
        m.register_forward_hook(lambda _m, _i, _o, name=name: executed.append(name))
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
    ]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(example_input)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    if not executed:
        raise ValueError(f"no nn.Linear was executed in a forward pass of {type(model).__name__}")
    name = executed[-1]
    layer = model.get_submodule(name)
    assert isinstance(layer, nn.Linear)
    return name, layer


def flatten_feature(x: Tensor) -> Tensor:
    """[N, ...] -> [N, D]; 4-D feature maps are global-average-pooled first."""
    if x.dim() == 4:
        x = x.mean(dim=(2, 3))
    return torch.flatten(x, 1)


class FeatureTap:
    """Captures a feature on every forward of ``model``, keeping its autograd graph.

    With ``layer_name`` None (or ``"penultimate"``) it captures the input of the
    classifier, the last ``nn.Linear`` executed in each forward, flattened to [N, D].
    With a module name it captures that module's output (global-average-pooled if 4-D,
    then flattened). ``features`` holds the latest capture; ``layer_name`` the layer used.
    Use as a context manager or call ``remove()``.
    """

    def __init__(self, model: nn.Module, layer_name: str | None = None) -> None:
        self.model = model
        self.features: Tensor | None = None
        self._handles: list[RemovableHandle] = []
        self._last: tuple[str, Tensor] | None = None
        if layer_name is None or layer_name == PENULTIMATE:
            self.layer_name: str | None = None
            linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
            if not linears:
                raise ValueError(f"{type(model).__name__} has no nn.Linear classifier; pass layer_name")
            for name, module in linears:
                self._handles.append(module.register_forward_pre_hook(self._linear_input_hook(name)))
            self._handles.append(model.register_forward_pre_hook(self._reset))
            self._handles.append(model.register_forward_hook(self._finish))
        else:
            modules = dict(model.named_modules())
            if layer_name not in modules:
                close = difflib.get_close_matches(layer_name, [n for n in modules if n], n=3, cutoff=0.5)
                hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
                raise ValueError(f"no module named '{layer_name}' in {type(model).__name__}{hint}")
            self.layer_name = layer_name
            self._handles.append(modules[layer_name].register_forward_hook(self._output_hook))

    def _linear_input_hook(self, name: str) -> Callable[[nn.Module, tuple[Tensor, ...]], None]:
        def hook(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
            self._last = (name, args[0])

        return hook

    def _reset(self, _module: nn.Module, _args: tuple[Tensor, ...]) -> None:
        self._last = None

    def _finish(self, _module: nn.Module, _args: tuple[Tensor, ...], _output: Tensor) -> None:
        if self._last is None:
            raise RuntimeError(f"no nn.Linear was executed in the forward of {type(self.model).__name__}")
        self.layer_name, x = self._last
        self._last = None
        self.features = torch.flatten(x, 1)

    def _output_hook(self, _module: nn.Module, _args: tuple[Tensor, ...], output: Tensor) -> None:
        self.features = flatten_feature(output)

    def remove(self) -> None:
        """Remove all hooks; ``features`` keeps the last capture."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> FeatureTap:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()
