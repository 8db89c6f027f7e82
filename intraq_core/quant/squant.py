"""SQuant (Guo et al., ICLR 2022): data-free weight rounding and BN-based activation ranges.

No image, no label and no back-propagation: seconds on a CPU. :func:`squant_` turns a model
built by :func:`~intraq_core.quant.quantize` into a SQuant model in place.

**Weights.** SQuant approximates the task loss' Hessian of a layer by three diagonal parts:
element-wise, kernel-wise (the k×k elements of one input channel of one output channel) and
output-channel-wise. Minimizing them over the discrete rounding choices becomes the *Constrained
Absolute Sum of Error* (CASE): every element's rounding perturbation ``p = q - w/Δ`` (in grid
steps) stays within one step of ``w/Δ``, each kernel's summed perturbation satisfies
``|Σ p| ≤ 0.5`` (SQuant-K) and each output channel's ``|Σ p| ≤ 0.5`` (SQuant-C). The solver,
progressively, on the continuous grid position ``x = w/Δ + zp`` of each weight:

* **E** (element): round to nearest, ``|p| ≤ 0.5``.
* **K** (kernel): for each kernel with summed perturbation ``e``, flip ``k = round(|e|)`` elements
  against the sign of ``e`` (``e < 0``: rounded down too much, so ``k`` elements that were rounded
  down go up by one step; ``e > 0`` the converse), choosing the elements with the largest
  ``|p|`` (those closest to the midpoint, whose flip costs least: ``|p| → 1 - |p|``). Afterwards
  ``|e| ≤ 0.5``. Each kernel then nominates one element for the channel stage: if it flipped at
  least ``|e|`` (over-corrected) the last element it flipped, as a candidate to flip *back*; if it
  flipped fewer, the next element it would have flipped. Its priority is its current ``|p|``.
* **C** (output channel): the same flip on the channel's summed perturbation, choosing among the
  kernels' nominees only (one flip per kernel at most, so the kernel sums stay within ``|e| ≤ 1``).
  Without the K stage (``squant_kernel: false``, or 1×1 convs and Linear layers, whose kernels are
  single elements) every element of the channel is a candidate.

Flips never leave the quantizer's integer range ``[quant_min, quant_max]``. Ties in priority are
broken by element order (stable sort), so the result is deterministic.

The grid is the weight fake-quantizer's own (``WeightFakeQuant.qparams``: per-channel min/max, or
±max|w| when symmetric). The result is written back as *hardened* float weights: each weight
replaced by its chosen grid value, so the model's fake-quantizer returns it unchanged and every
later stage (export, distillation, evaluation) sees SQuant's rounding. Because the min/max
quantizer recomputes its grid from the current weight, the element that defines each channel's
minimum and maximum (or its largest magnitude) is *pinned* at its nearest rounding (never flipped):
the hardened channel then has the same grid. (The reference code keeps the grid fixed instead; the
difference is one element per channel.) Distillation starting from a SQuant model fine-tunes these
hardened weights like any other.

**Activations.** SQuant's paper sets activation ranges data-free from the BatchNorm statistics
("BN-based clipping from DFQ with a wider clip range", the same factor for every model at a bit
width). Its code measures, for each quantized activation, ``σ₊`` (the standard deviation of the
positive values; of all values for a signed tensor, divided by 1.25) on one forward pass of
synthetic input, and uses the range ``[0, s·σ₊]`` (``[-s·σ/1.25, s·σ/1.25]`` if signed), capped at
the observed maximum below 6 bits; ``s`` = 12 at 4 bits, 14 at 6 bits, 25 at 8 bits. Here that
forward pass is made to follow the BN statistics exactly: every BatchNorm layer's output is
replaced by samples of ``N(β_c, γ_c² σ_c²/(σ_c² + ε))`` per channel, the distribution its output has
when its input follows its running statistics (which it does on the training data by
construction), and everything after it (ReLU, residual additions, pooling) is computed by the
model's own graph. The network input, when quantized (``quant.quantize_input``), gets the exact
range of valid images, ``[0, 1]`` per channel mapped through the model's normalization. Bit widths
the paper does not use take the factor of the next published width (2-4 bits: 12, 5-6: 14,
7-8: 25); ``quant.squant_act_sigma`` overrides it.

SQuant quantizes the input of the last layer at 8 bits (its stated protocol, unlike IntraQ and
Qimera, which quantize every layer at the same width): ``quant.last_input_bits: 8`` reproduces it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx, nn

from intraq_core.config import QuantConfig
from intraq_core.models.introspect import bn_layers
from intraq_core.quant.act_quantizer import ActFakeQuant
from intraq_core.quant.layers import weight_quantized_layers
from intraq_core.quant.quantizer import WeightFakeQuant

__all__ = [
    "SQUANT_SIGMA",
    "SQuantReport",
    "act_sigma_factor",
    "squant_",
    "squant_activation_ranges",
    "squant_round",
    "squant_weight",
]

#: SQuant's activation clipping factor ``s`` per bit width (the paper's 4/6/8-bit values,
#: extended to the neighbouring widths it does not report).
SQUANT_SIGMA: dict[int, float] = {2: 12.0, 3: 12.0, 4: 12.0, 5: 14.0, 6: 14.0, 7: 25.0, 8: 25.0}
#: Below this bit width the activation range is also capped at the observed maximum.
CAP_BELOW_BITS = 6
#: SQuant divides the factor by this for signed activations.
SIGNED_DIVISOR = 1.25
#: Attempts at making the hardened weight a fixed point of the (stateless) weight quantizer.
FIXED_POINT_ITERATIONS = 8


def act_sigma_factor(bits: int, override: float | None = None) -> float:
    """SQuant's clipping factor ``s`` for activations at ``bits`` (or ``override``)."""
    if override is not None:
        return float(override)
    return SQUANT_SIGMA[int(bits)]


# -- weights -------------------------------------------------------------------------------------


def _flip(
    n: Tensor, err: Tensor, pri_up: Tensor, pri_down: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One flip pass over rows ``[R, M]``: make each row's summed perturbation ``|Σ err| ≤ 0.5``.

    A row whose sum ``e`` is negative flips ``round(|e|)`` of its up-candidates (largest
    ``pri_up`` first) up by one step; a positive one flips down-candidates down. Returns the new
    ``(n, err)``, the flip mask, the direction per row (True = up), the number of flips, the sum
    before flipping and the priority order used.
    """
    e = err.sum(dim=1)
    up = e < 0
    pri = torch.where(up[:, None], pri_up, pri_down)
    available = (pri > 0).sum(dim=1)
    k = torch.minimum(torch.round(e.abs()).long(), available)
    order = torch.argsort(pri, dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    flip = rank < k[:, None]
    step = torch.where(up, 1.0, -1.0).to(err.dtype)[:, None] * flip
    return n + step, err + step, flip, up, k, e, order


def squant_round(
    x: Tensor,
    quant_min: int,
    quant_max: int,
    *,
    kernel: bool = True,
    channel: bool = True,
    pinned: Tensor | None = None,
) -> Tensor:
    """SQuant's rounding of continuous grid positions ``x`` ``[OC, IC, E]`` to integers.

    ``x = w/Δ + zp`` per weight; ``E`` is the kernel size (1 for Linear and 1×1 convs). ``kernel``
    and ``channel`` turn the K and C stages on (both off = SQuant-E, round to nearest). ``pinned``
    (bool, same shape) marks elements that keep their nearest rounding. Returns integer-valued
    floats in ``[quant_min, quant_max]``.
    """
    if x.dim() != 3:
        raise ValueError(f"squant_round expects [out_channels, in_channels, kernel_elements], got {tuple(x.shape)}")
    x = x.double()
    oc, ic, el = x.shape
    n = torch.clamp(torch.round(x), quant_min, quant_max)
    err = n - x
    movable = torch.ones_like(x, dtype=torch.bool) if pinned is None else ~pinned.reshape(x.shape)
    pri_up = torch.where((err < 0) & (x < quant_max) & movable, err.abs(), torch.zeros_like(err))
    pri_down = torch.where((err > 0) & (x > quant_min) & movable, err.abs(), torch.zeros_like(err))
    if kernel and el > 1:
        rows = (oc * ic, el)
        n2, err2, _, up, k, e, order = _flip(
            n.reshape(rows), err.reshape(rows), pri_up.reshape(rows), pri_down.reshape(rows)
        )
        # Each kernel nominates one element for the channel stage (see the module docstring).
        c_up = torch.zeros(rows, dtype=err.dtype)
        c_down = torch.zeros(rows, dtype=err.dtype)
        r = torch.arange(rows[0])
        over = (k > 0) & (k.double() >= e.abs())
        last = order[r, (k - 1).clamp(min=0)]
        rev = r[over]
        # Flip back the last element flipped: the direction opposite to the kernel's.
        rev_up = rev[~up[over]]
        rev_down = rev[up[over]]
        c_up[rev_up, last[rev_up]] = err2[rev_up, last[rev_up]].abs()
        c_down[rev_down, last[rev_down]] = err2[rev_down, last[rev_down]].abs()
        under = ~over & (k < el) & (e != 0)
        nxt = order[r, k.clamp(max=el - 1)]
        pri_k = torch.where(up[:, None], pri_up.reshape(rows), pri_down.reshape(rows))
        valid = under & (pri_k[r, nxt] > 0)
        nom = r[valid]
        nom_up = nom[up[valid]]
        nom_down = nom[~up[valid]]
        c_up[nom_up, nxt[nom_up]] = pri_k[nom_up, nxt[nom_up]]
        c_down[nom_down, nxt[nom_down]] = pri_k[nom_down, nxt[nom_down]]
        n, err = n2.reshape(x.shape), err2.reshape(x.shape)
        pri_up, pri_down = c_up.reshape(x.shape), c_down.reshape(x.shape)
    if channel:
        rows = (oc, ic * el)
        n2, _, _, _, _, _, _ = _flip(n.reshape(rows), err.reshape(rows), pri_up.reshape(rows), pri_down.reshape(rows))
        n = n2.reshape(x.shape)
    return n.to(torch.float32)


def _extreme_mask(weight: Tensor, symmetric: bool) -> Tensor:
    """Per output channel, the element that defines the min/max quantizer's range (pinned)."""
    flat = weight.detach().reshape(weight.shape[0], -1)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    rows = torch.arange(flat.shape[0])
    if symmetric:
        mask[rows, flat.abs().argmax(dim=1)] = True
    else:
        mask[rows, flat.argmin(dim=1)] = True
        mask[rows, flat.argmax(dim=1)] = True
    return mask


@dataclass
class LayerFlips:
    """What SQuant did to one layer: flips per stage and the CASE it reached (in grid steps)."""

    elements: int
    flipped: int
    max_kernel_error: float
    max_channel_error: float
    nearest_max_channel_error: float


def _case(n: Tensor, x: Tensor) -> tuple[float, float]:
    err = n.double() - x.double()
    kernel = err.sum(dim=2).abs().max() if err.shape[2] > 1 else err.abs().max()
    return float(kernel), float(err.sum(dim=(1, 2)).abs().max())


@torch.no_grad()
def squant_weight(
    weight: Tensor, quantizer: WeightFakeQuant, *, kernel: bool = True, channel: bool = True
) -> tuple[Tensor, LayerFlips]:
    """SQuant-rounded copy of ``weight`` as float grid values of ``quantizer`` (hardened).

    ``quantizer(result)`` returns ``result`` exactly (a fixed point of the fake quantizer).
    """
    w = weight.detach().float()
    scale, zero_point, qmin, qmax = quantizer.qparams(w)
    shape = (w.shape[0], w.shape[1] if w.dim() > 1 else 1, -1)
    view = (-1,) + (1,) * (w.dim() - 1)
    inv = 1.0 / scale.view(view)
    zp = zero_point.view(view).float()
    # The fused fake-quant op rounds ``w · (1/Δ)`` (float32) and adds the zero point: computing the
    # position the same way, in float64, keeps SQuant-E identical to it, ties included.
    scaled = w * inv
    nearest = torch.clamp(torch.round(scaled) + zp, qmin, qmax)
    x = (scaled.double() + zp.double()).reshape(shape)
    pinned = _extreme_mask(w, quantizer.symmetric).reshape(x.shape)
    n = squant_round(x, qmin, qmax, kernel=kernel, channel=channel, pinned=pinned).reshape(w.shape)
    hardened = (n - zp) * scale.view(view)
    for _ in range(FIXED_POINT_ITERATIONS):
        again = quantizer(hardened)
        if torch.equal(again, hardened):
            break
        hardened = again
    else:
        raise RuntimeError("SQuant: the hardened weight is not a fixed point of its fake quantizer")
    kernel_err, channel_err = _case(n.reshape(x.shape), x)
    _, nearest_channel = _case(nearest.reshape(x.shape), x)
    flips = LayerFlips(
        elements=int(n.numel()),
        flipped=int((n != nearest).sum()),
        max_kernel_error=kernel_err,
        max_channel_error=channel_err,
        nearest_max_channel_error=nearest_channel,
    )
    return hardened.to(weight.dtype), flips


# -- activations ---------------------------------------------------------------------------------


@dataclass
class ActStats:
    """What one activation quantizer saw on the BN-statistics forward pass."""

    minimum: float
    maximum: float
    sigma: float  # std of all values
    sigma_positive: float  # std of the positive values


def _input_quantizers(model: nn.Module) -> set[str]:
    """Names of the activation quantizers that read a graph input (the image)."""
    names: set[str] = set()
    graph = getattr(model, "graph", None)
    if not isinstance(graph, fx.Graph):
        return names
    for node in graph.nodes:
        if node.op != "call_module" or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        if node.args[0].op == "placeholder" and isinstance(model.get_submodule(str(node.target)), ActFakeQuant):
            names.add(str(node.target))
    return names


@torch.no_grad()
def _bn_statistics_pass(
    model: nn.Module, image_shape: Sequence[int], images: int, seed: int, device: torch.device
) -> dict[str, ActStats]:
    """One forward of ``images`` inputs with every BN output drawn from its own statistics."""
    gen = torch.Generator().manual_seed(int(seed))

    def bn_hook(module: nn.Module, _inputs: Any, output: Tensor) -> Tensor:
        var = module.running_var.float()
        eps = float(module.eps)
        gamma = module.weight.float() if module.weight is not None else torch.ones_like(var)
        beta = module.bias.float() if module.bias is not None else torch.zeros_like(var)
        std = gamma.abs() * torch.sqrt(var / (var + eps))
        view = (1, -1) + (1,) * (output.dim() - 2)
        noise = torch.randn(output.shape, generator=gen, dtype=torch.float32).to(output.device)
        return (beta.view(view) + std.view(view) * noise).to(output.dtype)

    stats: dict[str, ActStats] = {}

    def act_hook(name: str) -> Any:
        def hook(_module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            t = inputs[0].detach().float()
            pos = t[t > 0]
            stats[name] = ActStats(
                minimum=float(t.min()),
                maximum=float(t.max()),
                sigma=float(t.std()) if t.numel() > 1 else 0.0,
                sigma_positive=float(pos.std()) if pos.numel() > 1 else 0.0,
            )

        return hook

    handles = [m.register_forward_hook(bn_hook) for _, m in bn_layers(model)]
    quants = {name: m for name, m in model.named_modules() if isinstance(m, ActFakeQuant)}
    handles += [m.register_forward_pre_hook(act_hook(name)) for name, m in quants.items()]
    modes = {name: q.mode for name, q in quants.items()}
    training = model.training
    try:
        for q in quants.values():
            q.mode = "off"
        model.eval()
        x = torch.randn((images, *image_shape), generator=gen).to(device)
        model(x)
    finally:
        for h in handles:
            h.remove()
        for name, q in quants.items():
            if modes[name] != "frozen" or q.calibrated:
                q.mode = modes[name]
        model.train(training)
    return stats


def _range_from_stats(s: ActStats, bits: int, factor: float) -> tuple[float, float]:
    """SQuant's clipping rule on one activation's statistics."""
    if s.minimum < 0:
        alpha = factor * s.sigma / SIGNED_DIVISOR
        if bits < CAP_BELOW_BITS:
            alpha = min(alpha, max(s.maximum, -s.minimum))
        return -alpha, alpha
    hi = factor * s.sigma_positive
    if bits < CAP_BELOW_BITS:
        hi = min(hi, s.maximum)
    return 0.0, hi


def squant_activation_ranges(
    model: nn.Module,
    config: QuantConfig,
    *,
    image_shape: Sequence[int],
    normalization: tuple[Sequence[float], Sequence[float]] | None = None,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Set every activation quantizer's range by SQuant's data-free rule and freeze it.

    Returns ``{quantizer name: (lo, hi)}``. A quantizer that the forward pass never reaches is an
    error (it would have no range).
    """
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    stats = _bn_statistics_pass(model, image_shape, config.squant_act_images, seed, device)
    inputs = _input_quantizers(model)
    ranges: dict[str, tuple[float, float]] = {}
    for name, q in ((n, m) for n, m in model.named_modules() if isinstance(m, ActFakeQuant)):
        if name in inputs and normalization is not None:
            mean = torch.tensor(normalization[0], dtype=torch.float64)
            std = torch.tensor(normalization[1], dtype=torch.float64)
            lo, hi = float(((0.0 - mean) / std).min()), float(((1.0 - mean) / std).max())
        elif name in stats:
            lo, hi = _range_from_stats(stats[name], q.bits, act_sigma_factor(q.bits, config.squant_act_sigma))
        else:
            raise RuntimeError(f"SQuant: activation quantizer {name} was not reached by the forward pass")
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise RuntimeError(f"SQuant: non-finite range for {name}: ({lo}, {hi})")
        q.reset()
        bounds = torch.tensor([lo, hi], dtype=torch.float32, device=q.ema_min.device)
        q(bounds if q.channels is None else bounds.view(2, 1).expand(2, q.channels))  # every channel: one range
        q.mode = "frozen"
        ranges[name] = (lo, hi)
    return ranges


# -- the method ----------------------------------------------------------------------------------


@dataclass
class SQuantReport:
    """Per-layer flips and CASE, and the activation ranges, of one :func:`squant_` call."""

    layers: dict[str, LayerFlips] = field(default_factory=dict)
    act_ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        elements = sum(f.elements for f in self.layers.values())
        flipped = sum(f.flipped for f in self.layers.values())
        return {
            "layers": len(self.layers),
            "weights": elements,
            "flipped": flipped,
            "flipped_fraction": flipped / elements if elements else 0.0,
            "max_kernel_error": max((f.max_kernel_error for f in self.layers.values()), default=0.0),
            "max_channel_error": max((f.max_channel_error for f in self.layers.values()), default=0.0),
            "nearest_max_channel_error": max((f.nearest_max_channel_error for f in self.layers.values()), default=0.0),
            "activation_quantizers": len(self.act_ranges),
            "seconds": self.seconds,
        }


@torch.no_grad()
def squant_(
    model: nn.Module,
    config: QuantConfig,
    *,
    image_shape: Sequence[int],
    normalization: tuple[Sequence[float], Sequence[float]] | None = None,
    seed: int = 0,
) -> SQuantReport:
    """Apply SQuant in place to a model built by ``quantize(model, config)``.

    Every quantized layer's weight is replaced by its SQuant rounding (hardened float grid values,
    see the module docstring) and every activation quantizer gets SQuant's BN-based range, frozen.
    ``image_shape`` is the model's input ``(C, H, W)``; ``normalization`` its ``(mean, std)`` (for
    the input quantizer's range). ``seed`` drives the BN-statistics samples.

    Example::

        >>> import torch
        >>> from intraq_core.config import QuantConfig
        >>> from intraq_core.models import create_model
        >>> from intraq_core.config import ModelConfig
        >>> from intraq_core.quant import quantize, squant_
        >>> cfg = QuantConfig(method="squant", w_bits=4, a_bits=4)
        >>> model = quantize(create_model(ModelConfig(arch="cifar_resnet20")).eval(), cfg)
        >>> report = squant_(model, cfg, image_shape=(3, 32, 32))
        >>> model(torch.zeros(1, 3, 32, 32)).shape
        torch.Size([1, 10])
        >>> report.summary()["max_kernel_error"] <= 1.0
        True
    """
    import time

    t0 = time.perf_counter()
    report = SQuantReport()
    for name, layer in weight_quantized_layers(model).items():
        hardened, flips = squant_weight(
            layer.weight, layer.weight_quant, kernel=config.squant_kernel, channel=config.squant_channel
        )
        layer.weight.copy_(hardened)
        report.layers[name] = flips
    report.act_ranges = squant_activation_ranges(
        model, config, image_shape=image_shape, normalization=normalization, seed=seed
    )
    report.seconds = time.perf_counter() - t0
    return report
