"""``quantize(model, config)``: the one verb that turns a float classifier into a fake-quant student.

The model is traced with ``torch.fx`` and rewritten, following the reference placement:

- every ``nn.Conv2d`` / ``nn.Linear`` module becomes a :class:`QuantConv2d` /
  :class:`QuantLinear` (subclasses, so parameter names and state-dict keys are unchanged)
  whose weight is fake-quantized per output channel at ``w_bits`` (the first and last such
  layer in execution order may get ``first_layer_bits`` / ``last_layer_bits``);
- after every *activation site* (a call of ReLU, ReLU6, SiLU, GELU or hardswish: modules,
  ``F.relu``, ``torch.relu``, ``F.relu6``, ``F.silu``, ``F.gelu``, ``F.hardswish``,
  ``Tensor.relu``, in-place or not; see :func:`intraq_core.models.introspect.activation_site`)
  a new :class:`ActFakeQuant` at ``a_bits`` is inserted, registered as
  ``act_quant.<fx node name>``, unsigned after ReLU/ReLU6 and signed after the others (their
  outputs dip below zero); an activation module called twice gets two quantizers with
  separate ranges;
- optionally the network input (``quantize_input``) and every addition of two tensors
  (``quantize_residual``) get an activation quantizer too.

BatchNorm stays in float and is not folded; pooling and the network output are not quantized.
All activation quantizers start in mode ``"calibrate"``.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from intraq_core.config import QuantConfig
from intraq_core.models.introspect import activation_site
from intraq_core.quant.quantizer import ACT_MODES, ActFakeQuant, WeightFakeQuant

__all__ = [
    "QuantConv2d",
    "QuantLinear",
    "act_quantizers",
    "calibrate",
    "quant_summary",
    "quantize",
    "set_act_mode",
    "weight_quantized_layers",
]

ACT_QUANT_PREFIX = "act_quant"


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


class QuantConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose weight is fake-quantized per output channel at every forward."""

    weight_quant: WeightFakeQuant

    @classmethod
    def from_float(cls, conv: nn.Conv2d, weight_quant: WeightFakeQuant) -> QuantConv2d:
        """Quantized twin of ``conv`` that shares (not copies) its parameters."""
        return _convert(conv, cls, weight_quant)  # type: ignore[return-value]

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, self.weight_quant(self.weight), self.bias)


class QuantLinear(nn.Linear):
    """``nn.Linear`` whose weight is fake-quantized per output channel at every forward."""

    weight_quant: WeightFakeQuant

    @classmethod
    def from_float(cls, linear: nn.Linear, weight_quant: WeightFakeQuant) -> QuantLinear:
        """Quantized twin of ``linear`` that shares (not copies) its parameters."""
        return _convert(linear, cls, weight_quant)  # type: ignore[return-value]

    def forward(self, input: Tensor) -> Tensor:
        return F.linear(input, self.weight_quant(self.weight), self.bias)


_QUANT_CLASSES: dict[type[nn.Module], type[nn.Module]] = {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}

_INPLACE_FUNCTIONS = {F.relu_, torch.relu_, operator.iadd}
_INPLACE_KWARG_FUNCTIONS = {F.relu, F.relu6, F.silu, F.hardswish}  # in place when inplace=True
_INPLACE_METHODS = {"relu_", "add_"}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}
_NON_TENSOR_METHODS = {"size", "dim", "numel", "nelement", "item", "tolist", "stride", "__len__"}
_NON_TENSOR_FUNCTIONS = {getattr, len}


def _mutated_input(node: fx.Node, gm: fx.GraphModule) -> fx.Node | None:
    """The node whose tensor ``node`` modifies in place (in-place activation / add), else None."""
    inplace = False
    if node.op == "call_module":
        inplace = bool(getattr(gm.get_submodule(str(node.target)), "inplace", False))
    elif node.op == "call_function":
        inplace = node.target in _INPLACE_FUNCTIONS or (
            node.target in _INPLACE_KWARG_FUNCTIONS
            and bool(node.kwargs.get("inplace", node.args[1] if len(node.args) > 1 else False))
        )
    elif node.op == "call_method":
        inplace = node.target in _INPLACE_METHODS
    if inplace and node.args and isinstance(node.args[0], fx.Node):
        return node.args[0]
    return None


def _is_tensor(node: fx.Node, memo: dict[fx.Node, bool]) -> bool:
    """Whether ``node`` (statically) produces a tensor rather than a size, int or attribute."""
    if node not in memo:
        if node.op in ("placeholder", "call_module", "get_attr"):
            result = True
        elif node.op == "call_method":
            result = node.target not in _NON_TENSOR_METHODS and _is_tensor(node.args[0], memo)  # type: ignore[arg-type]
        elif node.op == "call_function":
            if node.target in _NON_TENSOR_FUNCTIONS:
                result = False
            else:
                result = any(_is_tensor(n, memo) for n in node.all_input_nodes)
        else:
            result = False
        memo[node] = result
    return memo[node]


def _is_residual_add(node: fx.Node, memo: dict[fx.Node, bool]) -> bool:
    if not (
        (node.op == "call_function" and node.target in _ADD_FUNCTIONS)
        or (node.op == "call_method" and node.target in _ADD_METHODS)
    ):
        return False
    operands = node.args[:2]
    return len(operands) == 2 and all(isinstance(a, fx.Node) and _is_tensor(a, memo) for a in operands)


def _insert_act_quant(gm: fx.GraphModule, container: nn.ModuleDict, node: fx.Node, quant: ActFakeQuant) -> None:
    """Insert ``quant`` after ``node`` and route every later reader of its value through it."""
    graph = gm.graph
    container[node.name] = quant
    with graph.inserting_after(node):
        qnode = graph.call_module(f"{ACT_QUANT_PREFIX}.{node.name}", (node,))
    node.replace_all_uses_with(qnode, delete_user_cb=lambda user: user is not qnode)
    mutated = _mutated_input(node, gm)
    if mutated is not None:
        # An in-place op also changes its input's tensor: reads of it after the op see the new
        # value, so they must see the quantized one too.
        later: set[fx.Node] = set()
        cursor = qnode.next
        while cursor.op != "root":
            later.add(cursor)
            cursor = cursor.next
        mutated.replace_all_uses_with(qnode, delete_user_cb=lambda user: user in later)


def _trace(model: nn.Module) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, ...)
        raise RuntimeError(
            f"quantize() needs a torch.fx-traceable model; tracing {type(model).__name__} failed: {exc}"
        ) from exc


def _last_layer_feeders(gm: fx.GraphModule, layer_names: list[str], quantized_here: Any) -> set[fx.Node]:
    """The activation nodes (those that get a quantizer) whose values reach the last weight layer
    without passing another weight layer: the quantizers of the last layer's input."""
    last = layer_names[-1]
    layers = set(layer_names)
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == last]
    found: set[fx.Node] = set()
    seen: set[fx.Node] = set()
    stack = [a for n in calls for a in n.all_input_nodes]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if quantized_here(node):
            found.add(node)
        elif not (node.op == "call_module" and node.target in layers):
            stack.extend(node.all_input_nodes)
    return found


def quantize(model: nn.Module, config: QuantConfig) -> fx.GraphModule:
    """Fake-quantized copy of ``model`` (a ``torch.fx.GraphModule``), per ``config``.

    The model is deep-copied first, so the result shares nothing mutable with it (the
    teacher is never touched). Only ``nn.Conv2d``/``nn.Linear`` *modules* are quantized
    (exact types; functional convs are left alone) and submodules that the forward never
    uses are dropped by tracing. State-dict keys of the original layers are unchanged; the
    quantizers add ``act_quant.<node>.{ema_min,ema_max,num_updates,mode_code}``. If the
    model has a single conv/linear layer, ``first_layer_bits`` wins over ``last_layer_bits``.
    ``last_input_bits`` sets the bits of the activation quantizers whose output reaches the last
    layer without another weight layer in between (its input, e.g. the ReLU before the pooled
    classifier). ``config.method`` does not change the structure built here: SQuant is applied
    afterwards by :func:`intraq_core.quant.squant_`.
    """
    if any(isinstance(m, (ActFakeQuant, WeightFakeQuant)) for m in model.modules()):
        raise ValueError("model is already quantized (it contains fake-quant modules)")
    training = model.training
    gm = _trace(copy.deepcopy(model))
    gm.training = training
    graph = gm.graph

    # Weights: swap modules, first/last in execution order.
    layer_names: list[str] = []
    for node in graph.nodes:
        if (
            node.op == "call_module"
            and type(gm.get_submodule(node.target)) in _QUANT_CLASSES
            and node.target not in layer_names
        ):
            layer_names.append(node.target)
    for i, name in enumerate(layer_names):
        bits = config.w_bits
        if i == len(layer_names) - 1 and config.last_layer_bits is not None:
            bits = config.last_layer_bits
        if i == 0 and config.first_layer_bits is not None:
            bits = config.first_layer_bits
        module = gm.get_submodule(name)
        parent_name, _, attr = name.rpartition(".")
        parent = gm.get_submodule(parent_name) if parent_name else gm
        quantizer = weight_quantizer(config, bits, int(module.weight.shape[0]))
        new = _QUANT_CLASSES[type(module)].from_float(module, quantizer)  # type: ignore[attr-defined]
        setattr(parent, attr, new)

    # Activations.
    if hasattr(gm, ACT_QUANT_PREFIX):
        raise ValueError(f"model already has an attribute '{ACT_QUANT_PREFIX}', which quantize() needs")
    container = nn.ModuleDict()
    gm.add_module(ACT_QUANT_PREFIX, container)

    def new_act(bits: int, signed: bool = True) -> ActFakeQuant:
        return ActFakeQuant(
            bits,
            ema_decay=config.ema_decay,
            range_method=config.act_range,
            lp_norm=config.lp_norm,
            learn_scale=config.trains_act_scale,
            signed=signed,
        )

    memo: dict[fx.Node, bool] = {}

    def quantized_here(node: fx.Node) -> bool:
        return activation_site(node, gm) is not None or (config.quantize_residual and _is_residual_add(node, memo))

    feeders: set[fx.Node] = set()
    if config.last_input_bits is not None and layer_names:
        feeders = _last_layer_feeders(gm, layer_names, quantized_here)
    input_pending = config.quantize_input
    for node in list(graph.nodes):
        if node.op == "placeholder":
            if input_pending:  # the first input only (the image of a classifier)
                _insert_act_quant(gm, container, node, new_act(config.input_bits))
                input_pending = False
        elif (site := activation_site(node, gm)) is not None:
            bits = config.last_input_bits if node in feeders else config.a_bits
            _insert_act_quant(gm, container, node, new_act(bits, site.signed))  # type: ignore[arg-type]
        elif config.quantize_residual and _is_residual_add(node, memo):
            bits = config.last_input_bits if node in feeders else config.a_bits
            _insert_act_quant(gm, container, node, new_act(bits))  # type: ignore[arg-type]

    container.train(training)
    graph.lint()
    gm.recompile()
    return gm


def act_quantizers(model: nn.Module) -> dict[str, ActFakeQuant]:
    """All activation quantizers of ``model`` by qualified name, in registration order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ActFakeQuant)}


def weight_quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """All layers with a weight quantizer (``QuantConv2d``/``QuantLinear``) by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))}


def set_act_mode(model: nn.Module, mode: str) -> None:
    """Put every activation quantizer of ``model`` in ``mode`` (see :class:`ActFakeQuant`).

    Freezing checks all quantizers first and names the uncalibrated ones in the error.
    """
    if mode not in ACT_MODES:
        raise ValueError(f"unknown activation quantizer mode {mode!r}; expected one of {ACT_MODES}")
    quants = act_quantizers(model)
    if mode == "frozen":
        missing = [name for name, q in quants.items() if not q.calibrated]
        if missing:
            raise RuntimeError(
                f"cannot freeze: {len(missing)} activation quantizer(s) were never calibrated "
                f"(not reached by any calibration batch?): {', '.join(missing)}"
            )
    for q in quants.values():
        q.mode = mode


def _model_device(model: nn.Module) -> torch.device | None:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return None


def calibrate(model: nn.Module, batches: Iterable[Any], *, freeze: bool = True) -> int:
    """Calibrate the activation ranges on ``batches``; return the number of batches used.

    Sets every activation quantizer to ``"calibrate"``, runs the model in eval mode under
    ``no_grad`` on each batch (a tensor, or a tuple/list whose first item is the input; moved
    to the model's device), restores the train/eval mode, then freezes the ranges if
    ``freeze``. Calibration continues the existing EMAs (see ``ActFakeQuant.reset``).
    """
    set_act_mode(model, "calibrate")
    device = _model_device(model)
    training = model.training
    model.eval()
    count = 0
    try:
        with torch.no_grad():
            for batch in batches:
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                if device is not None:
                    x = x.to(device, non_blocking=True)
                model(x)
                count += 1
    finally:
        model.train(training)
    if freeze:
        set_act_mode(model, "frozen")
    return count


def quant_summary(model: nn.Module) -> list[dict[str, Any]]:
    """One row per quantizer, for reports.

    Keys: ``name``, ``kind`` (``conv2d``, ``linear`` or ``act``), ``bits``, ``range``
    (weights: overall min/max of the float weight; activations: corrected EMA range, None if
    uncalibrated) and ``scale`` (weights: mean per-channel Δ; activations: Δ or None).
    Weight rows add ``symmetric``; activation rows add ``mode`` and ``updates``.
    """
    rows: list[dict[str, Any]] = []
    with torch.no_grad():
        for name, layer in weight_quantized_layers(model).items():
            weight = layer.weight
            scale = layer.weight_quant.qparams(weight)[0]
            rows.append(
                {
                    "name": name,
                    "kind": "conv2d" if isinstance(layer, QuantConv2d) else "linear",
                    "bits": layer.weight_quant.bits,
                    "symmetric": layer.weight_quant.symmetric,
                    "range": (float(weight.min()), float(weight.max())),
                    "scale": float(scale.mean()),
                }
            )
        for name, quant in act_quantizers(model).items():
            row: dict[str, Any] = {
                "name": name,
                "kind": "act",
                "bits": quant.bits,
                "signed": quant.signed,
                "mode": quant.mode,
                "updates": int(quant.num_updates),
                "range": None,
                "scale": None,
            }
            if quant.calibrated:
                lo, hi = quant.range()
                row["range"] = (float(lo), float(hi))
                row["scale"] = float(quant.qparams()[0])
            rows.append(row)
    return rows
