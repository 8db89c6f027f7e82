"""Where activation quantizers go in a traced model: the fx trace and the walks over its graph.

The model is traced with ``torch.fx``, quantizable weight layers kept as leaves (:func:`trace_model`). From each
weight layer's input the graph is walked back through the operations that keep a tensor on its grid (pooling,
reshaping, dropout, zero padding, slicing) to the node that produced the values (:func:`producer_of`); whether
those values are provably non-negative decides an unsigned grid (:func:`non_negative`). :func:`insert_act_quant`
puts a quantizer after a node and routes every later reader (in-place ops included) through it.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from intraq_core.errors import QuantizationError
from intraq_core.models.introspect import activation_site
from intraq_core.quant.act_quantizer import ActFakeQuant
from intraq_core.quant.layers import quant_base

__all__ = [
    "ACT_QUANT_PREFIX",
    "depthwise_only_inputs",
    "input_producers",
    "insert_act_quant",
    "is_residual_add",
    "last_layer_feeders",
    "non_negative",
    "producer_of",
    "trace_model",
]

#: Name of the ``ModuleDict`` that holds a student's activation quantizers (``act_quant.<fx node name>``).
ACT_QUANT_PREFIX = "act_quant"


class _Tracer(fx.Tracer):
    """fx tracer that keeps quantizable weight layers as leaves, user subclasses included."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return quant_base(m) is not None or super().is_leaf_module(m, module_qualified_name)


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


def is_residual_add(node: fx.Node, memo: dict[fx.Node, bool]) -> bool:
    if not (
        (node.op == "call_function" and node.target in _ADD_FUNCTIONS)
        or (node.op == "call_method" and node.target in _ADD_METHODS)
    ):
        return False
    operands = node.args[:2]
    return len(operands) == 2 and all(isinstance(a, fx.Node) and _is_tensor(a, memo) for a in operands)


def insert_act_quant(gm: fx.GraphModule, container: nn.ModuleDict, node: fx.Node, quant: ActFakeQuant) -> None:
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


def trace_model(model: nn.Module) -> fx.GraphModule:
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


def producer_of(node: fx.Node, gm: fx.GraphModule) -> fx.Node:
    """Walk back from ``node`` through grid-keeping operations to the node that made its values."""
    while (source := _pass_through(node, gm)) is not None:
        node = source
    return node


def non_negative(node: fx.Node, gm: fx.GraphModule, memo: dict[fx.Node, bool]) -> bool:
    """Whether ``node``'s values are provably >= 0 (from what produced them)."""
    if node not in memo:
        producer = producer_of(node, gm)
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
                non_negative(a, gm, memo) if isinstance(a, fx.Node) else isinstance(a, (int, float)) and a >= 0
                for a in operands
            )
        memo[node] = result
    return memo[node]


def _is_depthwise(module: nn.Module) -> bool:
    """A Conv1d/Conv2d whose every output reads one input channel (``groups == in_channels > 1``)."""
    return isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups == module.in_channels > 1


def input_producers(gm: fx.GraphModule, weight_nodes: list[fx.Node]) -> dict[fx.Node, fx.Node]:
    """Each weight layer reading a node → the producer of its input (:func:`producer_of`), walked once."""
    return {
        layer: producer_of(layer.args[0], gm)
        for layer in weight_nodes
        if layer.args and isinstance(layer.args[0], fx.Node)
    }


def depthwise_only_inputs(gm: fx.GraphModule, producers: dict[fx.Node, fx.Node]) -> dict[fx.Node, int]:
    """The producers (see :func:`input_producers`) whose every weight-layer reader is a depthwise conv
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


def last_layer_feeders(gm: fx.GraphModule, layer_names: list[str], quantized_here: Any) -> set[fx.Node]:
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
