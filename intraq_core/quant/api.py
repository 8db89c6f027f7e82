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
    ['image (float: quant.quantize_input=false)', 'act_quant._2 (4-bit, signed)', 'act_quant._3 (4-bit, signed)']
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable

from torch import fx, nn

from intraq_core.config import QuantConfig
from intraq_core.errors import QuantizationError
from intraq_core.models.introspect import activation_site
from intraq_core.quant.act_quantizer import ActFakeQuant
from intraq_core.quant.layers import QUANT_CLASSES, float_layers, quant_base, weight_quantizer
from intraq_core.quant.placement import (
    ACT_QUANT_PREFIX,
    depthwise_only_inputs,
    input_producers,
    insert_act_quant,
    is_residual_add,
    last_layer_feeders,
    non_negative,
    producer_of,
    trace_model,
)
from intraq_core.quant.quantizer import WeightFakeQuant
from intraq_core.quant.summary import MAP_KEY

__all__ = ["QuantizationWarning", "quantize"]


class QuantizationWarning(UserWarning):
    """A conv/linear layer of the model was left in float (see the message for which and why)."""


def quantize(model: nn.Module, config: QuantConfig) -> fx.GraphModule:
    """Fake-quantized copy of ``model`` (a ``torch.fx.GraphModule``), per ``config``.

    The model is deep-copied first, so the result shares nothing mutable with it (the
    teacher is never touched); submodules that the forward never uses are dropped by tracing.
    State-dict keys of the original layers are unchanged; the quantizers add
    ``act_quant.<node>.{ema_min,ema_max,num_updates,mode_code}``. If the model has a single
    weight layer, ``first_layer_bits`` wins over ``last_layer_bits``. ``last_input_bits`` sets
    the bits of the activation quantizers whose output reaches the last layer without another
    weight layer in between (its input, e.g. the pooled features of the classifier); ``act_bits``
    sets named activation quantizers' bits over both (an unknown name is an error).
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
    gm = trace_model(copy.deepcopy(model))
    gm.training = training
    graph = gm.graph

    # Weights: swap modules, first/last in execution order.
    layer_names: list[str] = []
    for node in graph.nodes:
        if (
            node.op == "call_module"
            and quant_base(gm.get_submodule(node.target)) is not None
            and node.target not in layer_names
        ):
            layer_names.append(node.target)
    left_float = float_layers(model, gm, layer_names)
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
        base = quant_base(module)
        assert base is not None
        setattr(parent, attr, QUANT_CLASSES[base].from_float(module, quantizer))  # type: ignore[attr-defined]

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
    producers = input_producers(gm, weight_nodes)  # before any quantizer is inserted
    if config.act_placement == "weight_inputs":
        for producer in producers.values():
            if from_weights[producer]:
                sites.setdefault(producer, not non_negative(producer, gm, nonneg))
    else:
        for node in graph.nodes:
            if (site := activation_site(node, gm)) is not None:
                sites[node] = site.signed
    if config.quantize_residual:
        for node in graph.nodes:
            if is_residual_add(node, tensor_memo) and node not in sites:
                sites[node] = config.act_placement == "after_activations" or not non_negative(node, gm, nonneg)
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
    quant_names = {node: f"{ACT_QUANT_PREFIX}.{node.name}" for node in sites}  # each site's quantizer
    unknown = sorted(set(config.act_bits) - set(quant_names.values()))
    if unknown:
        raise QuantizationError(
            f"quant.act_bits names {', '.join(unknown)}, which {type(model).__name__} does not have; its activation "
            f"quantizers: {', '.join(sorted(quant_names.values()))}"
        )
    feeders: set[fx.Node] = set()
    if config.last_input_bits is not None:
        feeders = last_layer_feeders(gm, layer_names, lambda n: n in sites)

    container = nn.ModuleDict()
    gm.add_module(ACT_QUANT_PREFIX, container)

    per_channel = depthwise_only_inputs(gm, producers) if config.depthwise_act_per_channel else {}

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

    input_quant: str | None = None
    for node in list(graph.nodes):
        if node.op == "placeholder":
            if config.quantize_input and input_quant is None:  # the first input (the image)
                insert_act_quant(gm, container, node, new_act(config.input_bits, True))
                input_quant = f"{ACT_QUANT_PREFIX}.{node.name}"
        elif node in sites:
            bits = config.last_input_bits if node in feeders else config.a_bits
            bits = config.act_bits.get(quant_names[node], bits)
            quant = new_act(bits, sites[node], per_channel.get(node))  # type: ignore[arg-type]
            insert_act_quant(gm, container, node, quant)

    # The map: what each weight layer reads, and what stayed float.
    layer_inputs = []
    mapped: set[str] = set()  # a module called twice is mapped once (its first call)
    for layer in weight_nodes:
        if layer.target in mapped:
            continue
        mapped.add(str(layer.target))
        # Walked again: the quantizers just inserted (and in-place ops rerouted) are what it reads now.
        source = layer.args[0] if layer.args and isinstance(layer.args[0], fx.Node) else None
        producer = producer_of(source, gm) if source is not None else None
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
