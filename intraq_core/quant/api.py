"""``quantize(model, config)``: the one verb that turns a float classifier into a fake-quant student.

The model is traced with ``torch.fx`` (``nn.Conv1d``/``nn.Conv2d``/``nn.Linear`` and their
subclasses with the standard forward are kept as leaf modules) and rewritten:

- every such layer becomes a :class:`QuantConv1d` / :class:`QuantConv2d` / :class:`QuantLinear`
  (subclasses, so parameter names and state-dict keys are unchanged) whose weight is
  fake-quantized per output channel at ``w_bits`` (the first and last such layer in execution
  order may get ``first_layer_bits`` / ``last_layer_bits``); a conv/linear that cannot be
  quantized (a subclass with its own forward, ``Conv3d``, a functional ``F.conv2d`` call) is
  left float and named in a :class:`QuantizationWarning`;
- activation quantizers (:class:`ActFakeQuant` at ``a_bits``, registered as
  ``act_quant.<fx node name>``) go where ``config.act_placement`` says:

  - ``"weight_inputs"`` (default; BRECQ/QDrop/Genie): on the input tensor of every quantized
    weight layer, whatever produced it. The graph is walked back from each layer's input
    through the operations that keep a tensor on its grid (pooling, flatten/view/reshape,
    dropout, identity, zero padding, slicing) to the node that produced the values; that node
    gets one quantizer, shared by every layer it feeds and read by every other user. A
    tensor computed from the image alone (the first layer's input) is quantized only with
    ``quantize_input`` (at ``input_bits``, on the image itself);
  - ``"after_activations"`` (ZeroQ/IntraQ reference): after every activation-function call
    (:func:`intraq_core.models.introspect.activation_site`) and nowhere else.

  The grid is unsigned where the producer is provably non-negative (ReLU, ReLU6, sigmoid, a
  pooling or sum of such values) and signed otherwise; an activation module called twice gets
  two quantizers with separate ranges. Optionally every addition of two tensors
  (``quantize_residual``) gets a quantizer too.

BatchNorm stays in float and is not folded; the network output is not quantized. All
activation quantizers start in mode ``"calibrate"``. :func:`quant_map` tells, after the fact,
which layers and tensors were quantized at which bits and what was left float, and why.

Example::

    >>> import torch
    >>> from torch import nn
    >>> from intraq_core.config import QuantConfig
    >>> from intraq_core.quant import quant_map, quantize
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.LeakyReLU(0.1),
    ...                     nn.Conv2d(8, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()
    >>> student = quantize(net, QuantConfig(w_bits=4, a_bits=4))
    >>> m = quant_map(student)
    >>> m["weight_layers"]["quantized"], m["activations"]["quantized"]
    (3, 2)
    >>> [row["input"] for row in m["layer_inputs"]]
    ['image (float: quant.quantize_input=false)', 'act_quant.2 (4-bit, signed)', 'act_quant.3 (4-bit, signed)']
"""

from __future__ import annotations

import copy
import operator
import warnings
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from intraq_core.config import QuantConfig
from intraq_core.errors import QuantizationError
from intraq_core.models.introspect import activation_site
from intraq_core.quant.quantizer import ACT_MODES, ActFakeQuant, WeightFakeQuant

__all__ = [
    "QuantConv1d",
    "QuantConv2d",
    "QuantLinear",
    "QuantizationWarning",
    "act_quantizers",
    "calibrate_ranges",
    "format_quant_map",
    "quant_map",
    "quant_summary",
    "quantize",
    "set_act_mode",
    "weight_quantized_layers",
]

ACT_QUANT_PREFIX = "act_quant"
#: Key of the quantization map in the student's ``GraphModule.meta`` (kept by ``deepcopy``).
MAP_KEY = "intraq_quant_map"


class QuantizationWarning(UserWarning):
    """A conv/linear layer of the model was left in float (see the message for which and why)."""


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


_QUANT_CLASSES: dict[type[nn.Module], type[nn.Module]] = {
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


def _quant_base(module: nn.Module) -> type[nn.Module] | None:
    """The float base class (Conv1d/Conv2d/Linear) ``module`` is quantized as, None if it cannot be.

    A subclass counts when its forward is the base class's (timm's ``Conv2dSame`` pads in its
    own forward, ``StdConv2d`` standardizes its weight: those are left float, with a warning).
    """
    if isinstance(module, QUANT_LAYER_TYPES):
        return None
    for base in _QUANT_CLASSES:
        if isinstance(module, base):
            return base if type(module).forward is base.forward else None
    return None


def _float_reason(module: nn.Module) -> str | None:
    """Why a conv/linear ``module`` stays float, None if it is quantized (or is no such layer)."""
    if isinstance(module, QUANT_LAYER_TYPES):
        return None
    if isinstance(module, tuple(_QUANT_CLASSES)) and _quant_base(module) is None:
        return f"{type(module).__name__} overrides forward() (only the standard conv/linear forward is quantized)"
    if isinstance(module, _UNSUPPORTED_LAYERS):
        return f"{type(module).__name__} is not supported"
    return None


class _Tracer(fx.Tracer):
    """fx tracer that keeps quantizable weight layers as leaves, user subclasses included."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return _quant_base(m) is not None or super().is_leaf_module(m, module_qualified_name)


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
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, ...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QuantizationError(
            f"quantize() needs a torch.fx-traceable model; tracing {type(model).__name__} failed: {first}"
        ) from exc
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


# -- where activation quantizers go ---------------------------------------------------------------
#: Operations whose output lies on the grid of their (first) input: a quantized tensor passes
#: through them quantized (an integer target pools, reshapes and pads with zeros on the input's
#: grid), so the walk from a weight layer's input back to its producer goes through them.
_PASS_MODULES: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.Flatten,
    nn.Unflatten,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Identity,
    nn.ZeroPad1d,
    nn.ZeroPad2d,
    nn.ChannelShuffle,
    nn.PixelShuffle,
    nn.PixelUnshuffle,
)
_PASS_FUNCTIONS = {
    F.max_pool1d,
    F.max_pool2d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool1d,
    F.adaptive_max_pool2d,
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.pixel_shuffle,
    F.pixel_unshuffle,
    torch.flatten,
    torch.reshape,
    torch.squeeze,
    torch.unsqueeze,
    torch.transpose,
    torch.permute,
    torch.mean,
    torch.channel_shuffle,
}
_PASS_METHODS = {
    "view",
    "reshape",
    "flatten",
    "squeeze",
    "unsqueeze",
    "permute",
    "transpose",
    "contiguous",
    "mean",
    "clone",
    "view_as",
    "reshape_as",
}
_SUM_FUNCTIONS = {operator.add, torch.add, torch.cat, torch.concat, operator.mul, torch.mul}
_SUM_METHODS = {"add", "mul"}


def _pass_through(node: fx.Node, gm: fx.GraphModule) -> fx.Node | None:
    """The input whose grid ``node``'s output lies on, None if ``node`` produces new values."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return None
    source = node.args[0]
    if node.op == "call_module":
        return source if isinstance(gm.get_submodule(str(node.target)), _PASS_MODULES) else None
    if node.op == "call_method":
        return source if node.target in _PASS_METHODS else None
    if node.op != "call_function":
        return None
    if node.target in _PASS_FUNCTIONS:
        return source
    if node.target is operator.getitem:
        index = node.args[1] if len(node.args) > 1 else None
        # Slicing a tensor keeps its values; an integer index may pick one output of a tuple.
        return source if isinstance(index, (slice, tuple)) else None
    if node.target is F.pad:
        mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
        value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else None)
        return source if mode == "constant" and not value else None
    return None


def _producer(node: fx.Node, gm: fx.GraphModule) -> fx.Node:
    """Walk back from ``node`` through grid-keeping operations to the node that made its values."""
    while (source := _pass_through(node, gm)) is not None:
        node = source
    return node


def _non_negative(node: fx.Node, gm: fx.GraphModule, memo: dict[fx.Node, bool]) -> bool:
    """Whether ``node``'s values are provably >= 0 (from what produced them)."""
    if node not in memo:
        producer = _producer(node, gm)
        site = activation_site(producer, gm)
        result = False
        if site is not None:
            result = not site.signed
        elif (producer.op == "call_function" and producer.target in _SUM_FUNCTIONS) or (
            producer.op == "call_method" and producer.target in _SUM_METHODS
        ):
            cat = producer.target in (torch.cat, torch.concat)
            operands = list(producer.args[0]) if cat and isinstance(producer.args[0], (list, tuple)) else []
            operands = operands or list(producer.args[:2])
            nodes = [a for a in operands if isinstance(a, fx.Node)]
            result = bool(nodes) and all(
                _non_negative(a, gm, memo) if isinstance(a, fx.Node) else isinstance(a, (int, float)) and a >= 0
                for a in operands
            )
        memo[node] = result
    return memo[node]


def _is_depthwise(module: nn.Module) -> bool:
    """A Conv1d/Conv2d whose every output reads one input channel (``groups == in_channels > 1``)."""
    return isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups == module.in_channels > 1


def _input_producers(gm: fx.GraphModule, weight_nodes: list[fx.Node]) -> dict[fx.Node, fx.Node]:
    """Each weight layer reading a node → the producer of its input (:func:`_producer`), walked once."""
    return {
        layer: _producer(layer.args[0], gm)
        for layer in weight_nodes
        if layer.args and isinstance(layer.args[0], fx.Node)
    }


def _depthwise_only_inputs(gm: fx.GraphModule, producers: dict[fx.Node, fx.Node]) -> dict[fx.Node, int]:
    """The producers (see :func:`_input_producers`) whose every weight-layer reader is a depthwise conv
    of the same input channels, with that channel count: their quantizer may be per channel."""
    readers: dict[fx.Node, list[nn.Module]] = {}
    for layer, producer in producers.items():
        readers.setdefault(producer, []).append(gm.get_submodule(str(layer.target)))
    out: dict[fx.Node, int] = {}
    for node, modules in readers.items():
        channels = {int(m.in_channels) for m in modules if _is_depthwise(m)}
        if len(channels) == 1 and all(_is_depthwise(m) for m in modules):
            out[node] = channels.pop()
    return out


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


def _float_layers(model: nn.Module, gm: fx.GraphModule, quantized: list[str]) -> list[dict[str, str]]:
    """Conv/linear layers of ``model`` that stay float, and functional conv/linear calls, with why."""
    done = set(quantized)
    rows: list[dict[str, str]] = []
    for name, module in model.named_modules():
        if name in done or any(name.startswith(r["name"] + ".") for r in rows):
            continue
        reason = _float_reason(module)
        if reason is None and isinstance(module, nn.MultiheadAttention):
            reason = "nn.MultiheadAttention: its projections are not quantized"
        elif reason is None and isinstance(module, tuple(_QUANT_CLASSES)):
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


def quantize(model: nn.Module, config: QuantConfig) -> fx.GraphModule:
    """Fake-quantized copy of ``model`` (a ``torch.fx.GraphModule``), per ``config``.

    The model is deep-copied first, so the result shares nothing mutable with it (the
    teacher is never touched); submodules that the forward never uses are dropped by tracing.
    State-dict keys of the original layers are unchanged; the quantizers add
    ``act_quant.<node>.{ema_min,ema_max,num_updates,mode_code}``. If the model has a single
    weight layer, ``first_layer_bits`` wins over ``last_layer_bits``. ``last_input_bits`` sets
    the bits of the activation quantizers whose output reaches the last layer without another
    weight layer in between (its input, e.g. the pooled features of the classifier).
    ``config.method`` does not change the structure built here: SQuant is applied afterwards by
    :func:`intraq_core.quant.squant_`. Layers left float are named in a
    :class:`QuantizationWarning`; :func:`quant_map` describes the result.

    Raises :class:`~intraq_core.errors.QuantizationError` when the model cannot be traced, has no
    weight layer to quantize, or no activation quantizer can be placed (``a_bits`` would be a
    label with nothing behind it).
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
            and _quant_base(gm.get_submodule(node.target)) is not None
            and node.target not in layer_names
        ):
            layer_names.append(node.target)
    left_float = _float_layers(model, gm, layer_names)
    if not layer_names:
        listed = "; ".join(f"{r['name']}: {r['reason']}" for r in left_float)
        why = f" ({listed})" if listed else ""
        raise QuantizationError(f"{type(model).__name__} has no Conv1d/Conv2d/Linear layer that can be quantized{why}")
    weight_bits: dict[str, int] = {}
    for i, name in enumerate(layer_names):
        bits = config.w_bits
        if i == len(layer_names) - 1 and config.last_layer_bits is not None:
            bits = config.last_layer_bits
        if i == 0 and config.first_layer_bits is not None:
            bits = config.first_layer_bits
        weight_bits[name] = bits
        module = gm.get_submodule(name)
        parent_name, _, attr = name.rpartition(".")
        parent = gm.get_submodule(parent_name) if parent_name else gm
        quantizer = weight_quantizer(config, bits, int(module.weight.shape[0]))
        base = _quant_base(module)
        assert base is not None
        setattr(parent, attr, _QUANT_CLASSES[base].from_float(module, quantizer))  # type: ignore[attr-defined]

    # Activations: which nodes get a quantizer, and whether their grid is signed.
    if hasattr(gm, ACT_QUANT_PREFIX):
        raise ValueError(f"model already has an attribute '{ACT_QUANT_PREFIX}', which quantize() needs")
    layer_set = set(layer_names)
    weight_nodes = [n for n in graph.nodes if n.op == "call_module" and n.target in layer_set]
    from_weights: dict[fx.Node, bool] = {}  # node's value depends on a weight layer's output
    for node in graph.nodes:
        from_weights[node] = (node.op == "call_module" and node.target in layer_set) or any(
            from_weights.get(a, False) for a in node.all_input_nodes
        )
    nonneg: dict[fx.Node, bool] = {}
    tensor_memo: dict[fx.Node, bool] = {}
    sites: dict[fx.Node, bool] = {}  # node -> signed
    producers = _input_producers(gm, weight_nodes)  # before any quantizer is inserted
    if config.act_placement == "weight_inputs":
        for producer in producers.values():
            if from_weights[producer]:
                sites.setdefault(producer, not _non_negative(producer, gm, nonneg))
    else:
        for node in graph.nodes:
            if (site := activation_site(node, gm)) is not None:
                sites[node] = site.signed
    if config.quantize_residual:
        for node in graph.nodes:
            if _is_residual_add(node, tensor_memo) and node not in sites:
                sites[node] = config.act_placement == "after_activations" or not _non_negative(node, gm, nonneg)
    if not sites and not config.quantize_input:
        reason = (
            "every weight layer reads the image directly"
            if config.act_placement == "weight_inputs"
            else "it calls no activation function (use quant.act_placement=weight_inputs)"
        )
        raise QuantizationError(
            f"quant.a_bits={config.a_bits} but no activation of {type(model).__name__} can be quantized: {reason} "
            "(set quant.quantize_input=true to quantize the image at quant.input_bits)"
        )
    feeders: set[fx.Node] = set()
    if config.last_input_bits is not None:
        feeders = _last_layer_feeders(gm, layer_names, lambda n: n in sites)

    container = nn.ModuleDict()
    gm.add_module(ACT_QUANT_PREFIX, container)

    per_channel = _depthwise_only_inputs(gm, producers) if config.depthwise_act_per_channel else {}

    def new_act(bits: int, signed: bool, channels: int | None = None) -> ActFakeQuant:
        return ActFakeQuant(
            bits,
            ema_decay=config.ema_decay,
            range_method=config.act_range,
            lp_norm=config.lp_norm,
            learn_scale=config.trains_act_scale,
            signed=signed,
            channels=channels,
        )

    quant_of: dict[fx.Node, str] = {}  # producer node -> its quantizer's qualified name
    input_quant: str | None = None
    for node in list(graph.nodes):
        if node.op == "placeholder":
            if config.quantize_input and input_quant is None:  # the first input (the image)
                _insert_act_quant(gm, container, node, new_act(config.input_bits, True))
                input_quant = f"{ACT_QUANT_PREFIX}.{node.name}"
        elif node in sites:
            bits = config.last_input_bits if node in feeders else config.a_bits
            quant = new_act(bits, sites[node], per_channel.get(node))  # type: ignore[arg-type]
            _insert_act_quant(gm, container, node, quant)
            quant_of[node] = f"{ACT_QUANT_PREFIX}.{node.name}"

    # The map: what each weight layer reads, and what stayed float.
    layer_inputs = []
    mapped: set[str] = set()  # a module called twice is mapped once (its first call)
    for layer in weight_nodes:
        if layer.target in mapped:
            continue
        mapped.add(str(layer.target))
        # Walked again: the quantizers just inserted (and in-place ops rerouted) are what it reads now.
        source = layer.args[0] if layer.args and isinstance(layer.args[0], fx.Node) else None
        producer = _producer(source, gm) if source is not None else None
        is_quant = producer is not None and producer.op == "call_module" and str(producer.target) != input_quant
        if is_quant and str(producer.target).startswith(ACT_QUANT_PREFIX + "."):
            quant = container[producer.target.split(".", 1)[1]]
            grid = "" if quant.channels is None else f", per channel ×{quant.channels}"
            text = f"{producer.target} ({quant.bits}-bit, {'signed' if quant.signed else 'unsigned'}{grid})"
            layer_inputs.append({"layer": layer.target, "input": text, "input_bits": quant.bits})
        elif producer is not None and not from_weights.get(producer, False):
            text = (
                f"image ({config.input_bits}-bit by {input_quant})"
                if input_quant
                else "image (float: quant.quantize_input=false)"
            )
            layer_inputs.append(
                {"layer": layer.target, "input": text, "input_bits": config.input_bits if input_quant else None}
            )
        else:
            text = "float (no quantizer on this path: quant.act_placement=after_activations)"
            layer_inputs.append({"layer": layer.target, "input": text, "input_bits": None})
    act_bits = [q.bits for q in container.values()]
    gm.meta[MAP_KEY] = {
        "placement": config.act_placement,
        "weight_layers": {
            "quantized": len(layer_names),
            "bits": _count(weight_bits.values()),
            "float": left_float,
        },
        "activations": {
            "quantized": len(container),
            "bits": _count(act_bits),
            "signed": sum(bool(q.signed) for q in container.values()),
            "unsigned": sum(not q.signed for q in container.values()),
            "per_channel": sum(q.channels is not None for q in container.values()),
            "image": input_quant is not None,
        },
        "layer_inputs": [{**row, "bits": weight_bits[row["layer"]]} for row in layer_inputs],
    }
    if left_float:
        listing = "; ".join(f"{r['name']}: {r['reason']}" for r in left_float)
        warnings.warn(QuantizationWarning(f"{len(left_float)} layer(s) left in float: {listing}"), stacklevel=2)

    container.train(training)
    graph.lint()
    gm.recompile()
    return gm


def _count(values: Iterable[int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in sorted(values):
        out[str(v)] = out.get(str(v), 0) + 1
    return out


def quant_map(model: nn.Module) -> dict[str, Any]:
    """What :func:`quantize` did to a model: a JSON-ready dict.

    ``placement``; ``weight_layers``: ``quantized`` (count), ``bits`` (count per bit width),
    ``float`` (``name`` and ``reason`` of every conv/linear left float); ``activations``:
    ``quantized``, ``bits``, ``signed``/``unsigned`` counts, ``per_channel`` (how many have one
    range per channel: inputs read only by depthwise convs), ``image`` (whether the input
    image is quantized); ``layer_inputs``: per weight layer in execution order, its ``bits``
    and what its ``input`` is (``act_quant.<node> (4-bit, signed)``, the image, or float).
    """
    meta = getattr(model, "meta", None)
    if not isinstance(meta, dict) or MAP_KEY not in meta:
        raise ValueError(f"{type(model).__name__} was not built by intraq_core.quant.quantize(): no quantization map")
    return copy.deepcopy(meta[MAP_KEY])


def format_quant_map(qmap: dict[str, Any], *, layers: bool = True) -> str:
    """The quantization map as text for a terminal or a log (one summary line, then one per layer)."""
    w, a = qmap["weight_layers"], qmap["activations"]
    bits = lambda d: ", ".join(f"{n} at {b}-bit" for b, n in d.items()) or "none"  # noqa: E731
    per_channel = f"; {a['per_channel']} per channel (depthwise inputs)" if a.get("per_channel") else ""
    lines = [
        f"weights: {w['quantized']} layer(s) quantized ({bits(w['bits'])}), {len(w['float'])} left float; "
        f"activations: {a['quantized']} tensor(s) quantized ({bits(a['bits'])}; {a['unsigned']} unsigned, "
        f"{a['signed']} signed{per_channel}), placement {qmap['placement']}"
    ]
    lines += [f"  float: {r['name']}: {r['reason']}" for r in w["float"]]
    if layers:
        lines += [f"  {r['layer']} (W{r['bits']}): input {r['input']}" for r in qmap["layer_inputs"]]
    return "\n".join(lines)


def act_quantizers(model: nn.Module) -> dict[str, ActFakeQuant]:
    """All activation quantizers of ``model`` by qualified name, in registration order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ActFakeQuant)}


def weight_quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """All layers with a weight quantizer (``QuantConv1d``/``QuantConv2d``/``QuantLinear``) by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QUANT_LAYER_TYPES)}


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


def calibrate_ranges(model: nn.Module, batches: Iterable[Any], *, freeze: bool = True) -> int:
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
                    "kind": "conv2d"
                    if isinstance(layer, QuantConv2d)
                    else ("conv1d" if isinstance(layer, QuantConv1d) else "linear"),
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
            if quant.channels is not None:
                row["channels"] = quant.channels
            if quant.calibrated:  # per channel: the widest range and the mean step
                lo, hi = quant.range()
                row["range"] = (float(lo.min()), float(hi.max()))
                row["scale"] = float(quant.qparams()[0].mean())
            rows.append(row)
    return rows
