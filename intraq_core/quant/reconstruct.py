"""Block-reconstruction PTQ on synthetic images: AdaRound + LSQ step sizes + QDrop, unit by unit.

The quantized model (a ``torch.fx.GraphModule`` from :func:`~intraq_core.quant.quantize`, with
stored weight ranges and calibrated activation ranges) is split into *units* at the points of
its graph where a single tensor is live: for a ResNet these are the stem, every residual block
and the head; for a network without skip connections, every layer. Unit by unit, in execution
order (BRECQ, Li et al. 2021; QDrop, Wei et al. 2022):

1. the unit's full-precision output on the full-precision inputs is the target (the same
   unit with its quantizers switched off: the teacher's own unit);
2. its weights get AdaRound's learnable rounding (``floor(w/Δ) + h(α)``) and, optionally,
   its activation step sizes are trained (LSQ);
3. the unit's input is the *quantized* model's activation (the units before it are already
   reconstructed); with QDrop, each element of that input and of every activation inside
   the unit is replaced by its unquantized value with probability ``drop_prob``;
4. Adam minimizes ``Σ_channels (ŷ - y)² + reg · Σ 1 - |2h(α)-1|^β``, β annealed from
   ``beta_start`` to ``beta_end`` after a warm-up without the regularizer;
5. the rounding is hardened (the chosen grid values are written into the weights) and the
   quantized inputs of the next unit are computed.

Only rounding decisions and step sizes change: the float weights move by less than one
quantization step, BN statistics and affine parameters are untouched — unless ``bias_lr`` > 0,
which also trains each unit's biases (BN shifts, conv/linear biases) against the same loss. Memory: the full-
precision and quantized activations of ``num_images`` images at one cut (CIFAR ResNet-20,
1,024 images: ~67 MB each).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, fx, nn

from intraq_core.config import ReconstructConfig
from intraq_core.quant.act_quantizer import ActFakeQuant
from intraq_core.quant.layers import QUANT_LAYER_TYPES, act_quantizers
from intraq_core.quant.quantizer import WeightFakeQuant

__all__ = ["ReconstructReport", "Unit", "graph_units", "merge_units", "reconstruct", "unit_module"]


@dataclass
class Unit:
    """A run of consecutive graph nodes with one input tensor and one output tensor."""

    name: str
    nodes: list[fx.Node]
    input: fx.Node
    output: fx.Node
    weight_layers: list[str]


@dataclass
class ReconstructReport:
    """Per-unit reconstruction error before and after (mean squared error per element)."""

    units: list[dict[str, float | str | int]] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict:
        return {"units": self.units, "seconds": self.seconds}


def _is_weight_layer(node: fx.Node, gm: fx.GraphModule) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), QUANT_LAYER_TYPES)


def _is_act_quant(node: fx.Node, gm: fx.GraphModule) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), ActFakeQuant)


def graph_units(gm: fx.GraphModule) -> list[Unit]:
    """Split ``gm`` into reconstruction units (see the module docstring).

    A cut is placed after every node where exactly one tensor is live. Each unit starts at a
    weight layer; the nodes without weights that follow it join it up to and including its
    activation quantizer; nodes without weights after that (pooling, flatten) start the next
    unit.
    """
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise ValueError(f"reconstruction needs a model with one input, this one has {len(placeholders)}")
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    last_use = {n: max((order[u] for u in n.users), default=order[n]) for n in gm.graph.nodes}
    defined: list[fx.Node] = list(placeholders)
    segments: list[tuple[list[fx.Node], fx.Node, fx.Node]] = []
    current: list[fx.Node] = []
    seg_input = placeholders[0]
    for node in nodes:
        current.append(node)
        defined.append(node)
        live = [d for d in defined if last_use[d] > order[node]]
        if len(live) == 1 and live[0] in current:
            segments.append((current, seg_input, live[0]))
            seg_input = live[0]
            current = []
            defined = [live[0]]
    if current:  # the tail up to the output node
        out = next(n for n in gm.graph.nodes if n.op == "output")
        result = out.args[0]
        if not isinstance(result, fx.Node):
            raise ValueError("reconstruction needs a model that returns one tensor")
        segments.append((current, seg_input, result))

    units: list[Unit] = []
    pending: list[fx.Node] = []  # weightless nodes after a closed unit: they lead the next unit
    pending_input: fx.Node | None = None
    closed = False  # the latest unit has an activation quantizer after its last weight layer
    for seg_nodes, seg_in, seg_out in segments:
        weights = [str(n.target) for n in seg_nodes if _is_weight_layer(n, gm)]
        if weights:
            units.append(Unit(weights[0], pending + seg_nodes, pending_input or seg_in, seg_out, weights))
            pending, pending_input = [], None
            last_weight = max(i for i, n in enumerate(seg_nodes) if _is_weight_layer(n, gm))
            closed = any(_is_act_quant(n, gm) for n in seg_nodes[last_weight:])
        elif units and not closed:
            units[-1].nodes += seg_nodes
            units[-1].output = seg_out
            closed = any(_is_act_quant(n, gm) for n in seg_nodes)
        else:
            if not pending:
                pending_input = seg_in
            pending += seg_nodes
    if not units:
        raise ValueError("reconstruction needs a model with at least one quantized Conv1d/Conv2d/Linear layer")
    if pending:
        units[-1].nodes += pending
        units[-1].output = segments[-1][2]
    return units


def merge_units(units: list[Unit], min_layers: int) -> list[Unit]:
    """Consecutive ``units`` merged, from the first on, until each holds ``min_layers`` weight layers.

    The units of :func:`graph_units` follow each other (each one's input is the previous one's
    output), so a merged unit is again a chain with one input and one output; a last remainder
    with fewer layers stays a unit of its own.
    """
    if min_layers <= 1:
        return units
    merged: list[Unit] = []
    for unit in units:
        last = merged[-1] if merged else None
        if last is not None and len(last.weight_layers) < min_layers:
            last.nodes = [*last.nodes, *unit.nodes]
            last.output = unit.output
            last.weight_layers = [*last.weight_layers, *unit.weight_layers]
        else:
            merged.append(Unit(unit.name, list(unit.nodes), unit.input, unit.output, list(unit.weight_layers)))
    return merged


def unit_module(gm: fx.GraphModule, unit: Unit) -> fx.GraphModule:
    """A ``GraphModule`` computing ``unit`` alone; it shares every submodule (and parameter) with ``gm``."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {unit.input: graph.placeholder("x")}

    def arg(node: fx.Node) -> fx.Node:
        if node not in env:
            if node.op == "get_attr":
                env[node] = graph.node_copy(node)
            else:
                raise ValueError(f"unit {unit.name} reads {node.name}, which is outside it")
        return env[node]

    for node in unit.nodes:
        env[node] = graph.node_copy(node, arg)
    graph.output(env[unit.output])
    return fx.GraphModule(gm, graph)


class _FloatTwin:
    """Context: every quantizer of a module switched off (the full-precision unit)."""

    def __init__(self, module: nn.Module) -> None:
        self.acts = [m for m in module.modules() if isinstance(m, ActFakeQuant)]
        self.weights = [m for m in module.modules() if isinstance(m, WeightFakeQuant)]

    def __enter__(self) -> None:
        self.modes = [(q, q.mode) for q in self.acts]
        for q in self.acts:
            q.mode = "off"
        for w in self.weights:
            w.enabled = False

    def __exit__(self, *exc: object) -> None:
        for q, mode in self.modes:
            q.mode = mode
        for w in self.weights:
            w.enabled = True


@torch.no_grad()
def _run(module: nn.Module, x: Tensor, batch: int, device: torch.device) -> Tensor:
    outs = [module(x[s : s + batch].to(device)).cpu() for s in range(0, x.shape[0], batch)]
    return torch.cat(outs)


def _rec_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Squared error summed over channels (dim 1), averaged over everything else (BRECQ's)."""
    return (pred - target).pow(2).sum(1).mean()


def _beta(cfg: ReconstructConfig, it: int) -> float:
    start = cfg.warmup * cfg.iterations
    rel = (it - start) / max(cfg.iterations - start, 1)
    return cfg.beta_end + (cfg.beta_start - cfg.beta_end) * max(0.0, 1.0 - rel)


def reconstruct(
    model: fx.GraphModule,
    images: Tensor,
    cfg: ReconstructConfig,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int, str], None] | None = None,
) -> ReconstructReport:
    """Reconstruct ``model`` (quantized, ranges calibrated and frozen) in place on ``images``.

    ``images`` are the synthetic training images (normalized, as the model expects); the first
    ``cfg.num_images`` are used. ``progress(done, total, unit)`` is called after each unit.
    Returns the per-unit MSE of the quantized unit before and after reconstruction (on its
    quantized inputs, without QDrop), and the seconds spent.

    Example::

        >>> import torch
        >>> from intraq_core.config import ModelConfig, QuantConfig, ReconstructConfig
        >>> from intraq_core.models import create_model
        >>> from intraq_core.quant import calibrate_ranges, quantize
        >>> teacher = create_model(ModelConfig(arch="cifar_resnet20")).eval()
        >>> qcfg = QuantConfig(method="reconstruct", weight_range="lp", act_range="lp")
        >>> student = quantize(teacher, qcfg)
        >>> images = torch.randn(32, 3, 32, 32)
        >>> calibrate_ranges(student, [images])
        1
        >>> report = reconstruct(student, images, ReconstructConfig(iterations=2, batch_size=8))
        >>> len(report.units)
        11
    """
    import time

    t0 = time.perf_counter()
    device = torch.device(device)
    model = model.to(device).eval()
    quants = act_quantizers(model)
    uncalibrated = [name for name, q in quants.items() if q.mode != "frozen"]
    if uncalibrated:
        raise RuntimeError(f"reconstruct() needs calibrated, frozen activation ranges; not frozen: {uncalibrated[:3]}")
    for name, layer in model.named_modules():
        if isinstance(layer, QUANT_LAYER_TYPES) and not layer.weight_quant.stateful:
            raise RuntimeError(f"reconstruct() needs stored weight ranges (quantize with method 'reconstruct'): {name}")
    n = images.shape[0] if cfg.num_images is None else min(cfg.num_images, images.shape[0])
    x_fp = images[:n].detach().cpu().float()
    x_q = x_fp
    gen = torch.Generator().manual_seed(seed)
    units = merge_units(graph_units(model), cfg.unit_layers)
    report = ReconstructReport()
    eval_batch = max(cfg.batch_size, 256)
    params = [p for p in model.parameters()]
    grad_flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        for done, unit in enumerate(units, 1):
            mod = unit_module(model, unit)
            with _FloatTwin(mod):
                y_fp = _run(mod, x_fp, eval_batch, device)
            before = float(_rec_loss(_run(mod, x_q, eval_batch, device), y_fp)) / max(y_fp[0].shape[0], 1)
            after = _reconstruct_unit(mod, x_fp, x_q, y_fp, cfg, gen, device)
            x_q = _run(mod, x_q, eval_batch, device)
            x_fp = y_fp
            after = float(_rec_loss(x_q, y_fp)) / max(y_fp[0].shape[0], 1)
            report.units.append(
                {"unit": unit.name, "layers": len(unit.weight_layers), "mse_before": before, "mse_after": after}
            )
            if progress is not None:
                progress(done, len(units), unit.name)
    finally:
        for p, flag in zip(params, grad_flags, strict=True):
            p.requires_grad_(flag)
    report.seconds = time.perf_counter() - t0
    return report


def _unit_biases(mod: nn.Module) -> list[nn.Parameter]:
    """The unit's additive per-channel parameters: BatchNorm shifts and weight-layer biases."""
    out = []
    for m in mod.modules():
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, *QUANT_LAYER_TYPES)):
            bias = getattr(m, "bias", None)
            if isinstance(bias, nn.Parameter):
                out.append(bias)
    return out


def _reconstruct_unit(
    mod: fx.GraphModule,
    x_fp: Tensor,
    x_q: Tensor,
    y_fp: Tensor,
    cfg: ReconstructConfig,
    gen: torch.Generator,
    device: torch.device,
) -> float:
    """Optimize one unit's rounding (and step sizes); harden; return the last training loss."""
    layers = [m for m in mod.modules() if isinstance(m, QUANT_LAYER_TYPES)]
    acts = [m for m in mod.modules() if isinstance(m, ActFakeQuant)]
    alphas = [layer.weight_quant.start_adaround(layer.weight) for layer in layers]
    scales = []
    if cfg.learn_act_scale and cfg.act_lr > 0:
        scales = [q.scale for q in acts if q.learn_scale and isinstance(q.scale, nn.Parameter)]
    groups = [{"params": alphas, "lr": cfg.lr}]
    if scales:
        for s in scales:
            s.requires_grad_(True)
        groups.append({"params": scales, "lr": cfg.act_lr})
    biases = _unit_biases(mod) if cfg.bias_lr > 0 else []
    if biases:
        for b in biases:
            b.requires_grad_(True)
        groups.append({"params": biases, "lr": cfg.bias_lr})
    opt = torch.optim.Adam(groups)
    drop_gen = torch.Generator(device=device).manual_seed(int(torch.randint(2**62, (1,), generator=gen)))
    for q in acts:
        q.drop_prob = cfg.drop_prob
        q.drop_generator = drop_gen
    n = x_q.shape[0]
    warm = int(cfg.warmup * cfg.iterations)
    loss_value = math.nan
    try:
        for it in range(cfg.iterations):
            idx = torch.randint(n, (min(cfg.batch_size, n),), generator=gen)
            inp = x_q[idx]
            if cfg.drop_prob > 0:
                mask = (torch.rand(inp.shape, generator=gen) < cfg.drop_prob).to(inp.dtype)
                inp = torch.lerp(inp, x_fp[idx], mask)
            inp, target = inp.to(device), y_fp[idx].to(device)
            if scales:  # cosine decay of the step-size learning rate, as BRECQ
                opt.param_groups[1]["lr"] = cfg.act_lr * 0.5 * (1 + math.cos(math.pi * it / cfg.iterations))
            rec = _rec_loss(mod(inp), target)
            loss = rec
            if it >= warm and cfg.reg_weight > 0:
                beta = _beta(cfg, it)
                loss = rec + cfg.reg_weight * sum(layer.weight_quant.rounding_regularizer(beta) for layer in layers)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_value = rec.item()
    finally:
        for q in acts:
            q.drop_prob = 0.0
            q.drop_generator = None
        for p in [*scales, *biases]:
            p.requires_grad_(False)
        for layer in layers:
            layer.weight_quant.harden(layer.weight)
    return loss_value
