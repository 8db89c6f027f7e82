"""Fake-quantization primitives: uniform affine quantizers with a straight-through gradient.

Math (standard affine form, equivalent to the reference's ``s = (2^k-1)/(b-a)``,
``z = round(s·a) + 2^(k-1)`` form): the range ``[a, b]`` is first extended to include 0
(``a = min(a, 0)``, ``b = max(b, 0)``) so that zero is exactly representable and the zero
point stays in ``[0, 2^k - 1]``; then

    Δ  = max(b - a, eps) / (2^k - 1)
    zp = clamp(round(-a / Δ), 0, 2^k - 1)
    x̂  = (clamp(round(x / Δ) + zp, 0, 2^k - 1) - zp) · Δ

Rounding is round-half-to-even (``torch.round``). After a ReLU the range starts at 0, so
``zp = 0`` and the grid is unsigned (``0 … (2^k-1)·Δ``). Fixed ranges use PyTorch's fused
``torch.fake_quantize_per_channel_affine`` / ``torch.fake_quantize_per_tensor_affine``, which
pass the gradient straight through inside the clamp range (zero outside it).

How a range is chosen (``range_method``):

- ``"minmax"`` (the reference): weights use the per-output-channel min/max of the current
  weight at every forward (stateless); activations use the EMA of the batch min/max.
- ``"lp"``: the range that minimizes the Lp quantization error ``mean |x - x̂|^p`` (p = 2.4
  by default, as BRECQ/Genie use), found by shrinking the min/max range by a factor in
  ``(0, 1]`` on a grid (:func:`lp_search`), per output channel for weights and per tensor (or
  per channel) for activations (on a sample of the calibration activations). The result is
  stored.

With ``learn_scale`` the stored step size Δ is an ``nn.Parameter`` trained by LSQ (Esser et
al., 2020): the straight-through estimator gives ``∂x̂/∂Δ = round(x/Δ) - x/Δ`` inside the
range and the clamp bound outside, and the gradient is scaled by ``1/sqrt(numel · qmax)``
(:func:`lsq_fake_quant`). The zero point stays fixed at its initial (integer) value.

:class:`WeightFakeQuant` (per output channel, here) also carries AdaRound's learnable rounding
(``start_adaround``, ``harden``) used by block reconstruction (:mod:`intraq_core.quant.reconstruct`).
The activation quantizer, built on the same grid, is :mod:`intraq_core.quant.act_quantizer`.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = [
    "EPS",
    "RANGE_METHODS",
    "RangeMethod",
    "WeightFakeQuant",
    "affine_qparams",
    "check_bits",
    "check_range_method",
    "lp_search",
    "lsq_fake_quant",
    "lsq_grad_factor",
    "symmetric_qparams",
]

EPS = 1e-8
"""Smallest range width, as in the reference (keeps Δ positive for constant tensors)."""
RangeMethod = Literal["minmax", "lp"]
RANGE_METHODS: tuple[str, ...] = ("minmax", "lp")

#: AdaRound's rectified sigmoid stretch (Nagel et al., 2020): h(α) = clamp(σ(α)(ζ-γ)+γ, 0, 1).
ADAROUND_ZETA = 1.1
ADAROUND_GAMMA = -0.1
#: Shrink factors tried by the Lp search: k / LP_GRID for k = 1 … LP_GRID.
LP_GRID = 100


def check_bits(bits: int) -> int:
    """``bits`` if it is a bit width the quantizers support (an int in [2, 8]), else ValueError."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer in [2, 8], got {bits!r}")
    return bits


def check_range_method(method: str) -> str:
    """``method`` if it is one of :data:`RANGE_METHODS`, else ValueError."""
    if method not in RANGE_METHODS:
        raise ValueError(f"unknown range method {method!r}; expected one of {RANGE_METHODS}")
    return method


def affine_qparams(lo: Tensor, hi: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Scale (float32) and zero point (int32) of the asymmetric quantizer of range [lo, hi].

    Works elementwise, so ``lo``/``hi`` may be scalars (per tensor) or vectors (per channel).
    The range is extended to include 0 first. Pure tensor ops: no host synchronization.
    """
    qmax = 2**bits - 1
    lo = torch.clamp(lo.detach().float(), max=0.0)
    hi = torch.clamp(hi.detach().float(), min=0.0)
    scale = torch.clamp(hi - lo, min=EPS) / qmax
    zero_point = torch.clamp(torch.round(-lo / scale), 0, qmax).to(torch.int32)
    return scale, zero_point


def symmetric_qparams(absmax: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Scale (float32) and zero point (int32 zeros) of the signed quantizer of range ±absmax.

    Levels are ``-(2^(k-1)-1) … 2^(k-1)-1`` (the most negative code is unused, so the grid
    is symmetric), ``Δ = max(absmax, eps) / (2^(k-1)-1)``.
    """
    qmax = 2 ** (bits - 1) - 1
    scale = torch.clamp(absmax.detach().float(), min=EPS) / qmax
    return scale, torch.zeros_like(scale, dtype=torch.int32)


def _fake_quant_rows(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """Fake-quantize rows of ``x`` [C, K] with per-row ``scale``/``zero_point`` [C] (plain ops)."""
    s = scale.unsqueeze(1)
    z = zero_point.unsqueeze(1).to(x.dtype)
    return (torch.clamp(torch.round(x / s) + z, qmin, qmax) - z) * s


@torch.no_grad()
def lp_search(
    x: Tensor,
    bits: int,
    *,
    p: float = 2.4,
    symmetric: bool = False,
    grid: int = LP_GRID,
    start: tuple[float | Tensor, float | Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """The range ``(lo, hi)`` per row of ``x`` [C, K] that minimizes ``mean |x - x̂|^p``.

    Candidates are the row's own min/max range (or ``start``, e.g. the extremes seen over all
    calibration batches when ``x`` is a sample: numbers, or [C] tensors; extended to include 0;
    ``±max|x|`` when ``symmetric``) shrunk by ``k / grid`` for ``k = 1 … grid``; ties keep the
    widest range. A 1-D ``x`` is one row. Returns float32 tensors of shape [C] (scalars for 1-D input).
    """
    squeeze = x.dim() == 1
    rows = x.detach().float().reshape(1, -1) if squeeze else x.detach().float().reshape(x.shape[0], -1)
    lo_data, hi_data = rows.amin(dim=1), rows.amax(dim=1)
    if start is not None:
        lo_data = torch.as_tensor(start[0], dtype=torch.float32, device=rows.device).expand_as(lo_data).clone()
        hi_data = torch.as_tensor(start[1], dtype=torch.float32, device=rows.device).expand_as(hi_data).clone()
    if symmetric:
        hi0 = torch.maximum(lo_data.abs(), hi_data.abs())
        lo0 = -hi0
        qmin, qmax = -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    else:
        lo0 = torch.clamp(lo_data, max=0.0)
        hi0 = torch.clamp(hi_data, min=0.0)
        qmin, qmax = 0, 2**bits - 1
    best_err = torch.full_like(hi0, math.inf)
    best_lo, best_hi = lo0.clone(), hi0.clone()
    for k in range(grid, 0, -1):
        factor = k / grid
        lo, hi = lo0 * factor, hi0 * factor
        if symmetric:
            scale, zp = symmetric_qparams(hi, bits)
        else:
            scale, zp = affine_qparams(lo, hi, bits)
        err = (rows - _fake_quant_rows(rows, scale, zp, qmin, qmax)).abs().pow(p).mean(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, lo, best_lo)
        best_hi = torch.where(better, hi, best_hi)
    if squeeze:
        return best_lo[0], best_hi[0]
    return best_lo, best_hi


def _grad_scaled(value: Tensor, factor: float) -> Tensor:
    """``value`` in the forward pass, gradient multiplied by ``factor`` in the backward pass."""
    scaled = value * factor
    return (value - scaled).detach() + scaled


def _round_ste(x: Tensor) -> Tensor:
    return (torch.round(x) - x).detach() + x


def lsq_fake_quant(
    x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, grad_factor: float, axis: int | None = None
) -> Tensor:
    """Fake quantization differentiable in ``x`` and in the step size ``scale`` (LSQ).

    ``scale``/``zero_point`` are scalars (per tensor) or vectors along ``axis`` (per channel);
    ``zero_point`` holds integer values. Forward: ``(clamp(round(x/Δ) + zp, qmin, qmax) - zp)·Δ``
    (the same values as the fused fake-quant ops); backward: straight-through for ``x`` inside
    the range (zero outside), LSQ's gradient for Δ, scaled by ``grad_factor``.
    """
    if axis is not None:
        shape = [1] * x.dim()
        shape[axis] = -1
        scale = scale.reshape(shape)
        zero_point = zero_point.reshape(shape)
    s = _grad_scaled(scale, grad_factor).to(x.dtype)
    z = zero_point.detach().to(x.dtype)
    v = torch.clamp(x / s + z, qmin, qmax)
    return (_round_ste(v) - z) * s


def lsq_grad_factor(numel: int, qmax: int) -> float:
    """LSQ's gradient scale of the step size, ``1/sqrt(numel · qmax)``."""
    return 1.0 / math.sqrt(max(numel, 1) * max(qmax, 1))


class WeightFakeQuant(nn.Module):
    """Per-output-channel (axis 0) fake quantizer of a weight tensor.

    With ``range_method="minmax"`` and no learned scale (the reference), the range of each
    output channel is the min/max (or ±max|w| when ``symmetric``) of the current weight,
    recomputed at every forward: the module holds no state and follows the weights while they
    are fine-tuned. Otherwise (``"lp"`` or ``learn_scale``) the per-channel step size and zero
    point are stored (buffers ``scale``/``zero_point`` of shape ``[channels]``; ``scale`` an
    ``nn.Parameter`` when learned), set from the weight at the first forward or by
    :meth:`init_range`.
    """

    initialized: Tensor

    def __init__(
        self,
        bits: int,
        symmetric: bool = False,
        *,
        range_method: RangeMethod = "minmax",
        lp_norm: float = 2.4,
        learn_scale: bool = False,
        channels: int | None = None,
    ) -> None:
        super().__init__()
        self.bits = check_bits(bits)
        self.symmetric = bool(symmetric)
        self.range_method = check_range_method(range_method)
        self.lp_norm = float(lp_norm)
        self.learn_scale = bool(learn_scale)
        self.stateful = self.range_method != "minmax" or self.learn_scale
        if self.stateful:
            if channels is None or channels < 1:
                raise ValueError("a stored-range weight quantizer needs its number of output channels")
            scale = torch.ones(channels, dtype=torch.float32)
            if self.learn_scale:
                self.scale = nn.Parameter(scale)
            else:
                self.register_buffer("scale", scale)
            self.register_buffer("zero_point", torch.zeros(channels, dtype=torch.float32))
            self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.alpha: nn.Parameter | None = None
        #: False passes the weight through unquantized (the float twin used by reconstruction).
        self.enabled = True

    @property
    def quant_min(self) -> int:
        return -(2 ** (self.bits - 1) - 1) if self.symmetric else 0

    @property
    def quant_max(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    def _minmax_qparams(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        flat = weight.detach().reshape(weight.shape[0], -1)
        if self.symmetric:
            return symmetric_qparams(flat.abs().amax(dim=1), self.bits)
        lo, hi = torch.aminmax(flat, dim=1)
        return affine_qparams(lo, hi, self.bits)

    @torch.no_grad()
    def init_range(self, weight: Tensor) -> None:
        """Set the stored range from ``weight`` (min/max or Lp search); no-op when stateless."""
        if not self.stateful:
            return
        if self.range_method == "lp":
            lo, hi = lp_search(weight.reshape(weight.shape[0], -1), self.bits, p=self.lp_norm, symmetric=self.symmetric)
            if self.symmetric:
                scale, zero_point = symmetric_qparams(hi, self.bits)
            else:
                scale, zero_point = affine_qparams(lo, hi, self.bits)
        else:
            scale, zero_point = self._minmax_qparams(weight)
        self.scale.copy_(scale.to(self.scale.device))
        self.zero_point.copy_(zero_point.float().to(self.zero_point.device))
        self.initialized.fill_(True)

    def qparams(self, weight: Tensor) -> tuple[Tensor, Tensor, int, int]:
        """``(scale[C], zero_point[C] int32, quant_min, quant_max)`` of ``weight`` (used by export)."""
        if not self.stateful:
            scale, zero_point = self._minmax_qparams(weight)
            return scale, zero_point, self.quant_min, self.quant_max
        if not bool(self.initialized):
            self.init_range(weight)
        scale = torch.clamp(self.scale.detach().float(), min=EPS)
        return scale, self.zero_point.round().to(torch.int32), self.quant_min, self.quant_max

    # -- AdaRound -------------------------------------------------------------------------------
    def start_adaround(self, weight: Tensor) -> nn.Parameter:
        """Make rounding learnable (AdaRound): returns the new parameter ``alpha`` (weight-shaped).

        ``alpha`` is initialized so that the soft rounding equals the weight's own fractional
        part, i.e. the quantized weight starts at the unrounded ``w/Δ`` on the grid.
        """
        if not self.stateful:
            raise RuntimeError("AdaRound needs a stored weight range (range_method 'lp' or a learned scale)")
        scale, _, _, _ = self.qparams(weight)
        s = scale.reshape(-1, *([1] * (weight.dim() - 1))).to(weight.device)
        frac = (weight.detach() / s) - torch.floor(weight.detach() / s)
        # h(α) = frac  ⇔  σ(α) = (frac - γ)/(ζ - γ)
        ratio = ((frac - ADAROUND_GAMMA) / (ADAROUND_ZETA - ADAROUND_GAMMA)).clamp(1e-4, 1 - 1e-4)
        self.alpha = nn.Parameter(torch.log(ratio / (1 - ratio)))
        return self.alpha

    def soft_rounding(self) -> Tensor:
        """AdaRound's h(α) ∈ [0, 1] (the rounding-up amount of each weight)."""
        assert self.alpha is not None
        return torch.clamp(torch.sigmoid(self.alpha) * (ADAROUND_ZETA - ADAROUND_GAMMA) + ADAROUND_GAMMA, 0.0, 1.0)

    def rounding_regularizer(self, beta: float) -> Tensor:
        """AdaRound's ``Σ 1 - |2h(α) - 1|^β`` (pushes every h to 0 or 1 as β decreases)."""
        return (1.0 - (2.0 * self.soft_rounding() - 1.0).abs().pow(beta)).sum()

    @torch.no_grad()
    def harden(self, weight: nn.Parameter) -> None:
        """End AdaRound: write the chosen grid values into ``weight`` and drop ``alpha``.

        Afterwards round-to-nearest of the stored weight gives the learned rounding, so the
        quantizer (and export) reproduce it exactly.
        """
        if self.alpha is None:
            return
        scale, zero_point, qmin, qmax = self.qparams(weight)
        shape = (-1, *([1] * (weight.dim() - 1)))
        s = scale.reshape(shape).to(weight.device)
        z = zero_point.reshape(shape).to(weight.device, weight.dtype)
        q = torch.floor(weight / s) + (self.alpha >= 0).to(weight.dtype)
        weight.copy_((torch.clamp(q + z, qmin, qmax) - z) * s)
        self.alpha = None

    def forward(self, weight: Tensor) -> Tensor:
        if not self.enabled:
            return weight
        if not self.stateful:
            scale, zero_point = self._minmax_qparams(weight)
            return torch.fake_quantize_per_channel_affine(weight, scale, zero_point, 0, self.quant_min, self.quant_max)
        if not bool(self.initialized):
            self.init_range(weight)
        qmin, qmax = self.quant_min, self.quant_max
        if self.alpha is not None:  # AdaRound: floor + soft rounding, scale fixed
            shape = (-1, *([1] * (weight.dim() - 1)))
            s = self.scale.detach().clamp(min=EPS).reshape(shape)
            z = self.zero_point.reshape(shape)
            q = torch.floor(weight.detach() / s) + self.soft_rounding()
            return (torch.clamp(q + z, qmin, qmax) - z) * s
        if self.learn_scale and torch.is_grad_enabled() and self.scale.requires_grad:
            factor = lsq_grad_factor(weight[0].numel(), qmax)
            return lsq_fake_quant(weight, self.scale.clamp(min=EPS), self.zero_point, qmin, qmax, factor, axis=0)
        scale = torch.clamp(self.scale.detach().float(), min=EPS)
        return torch.fake_quantize_per_channel_affine(
            weight, scale, self.zero_point.round().to(torch.int32), 0, qmin, qmax
        )

    def extra_repr(self) -> str:
        extra = f", range={self.range_method}, learn_scale={self.learn_scale}" if self.stateful else ""
        return f"bits={self.bits}, symmetric={self.symmetric}{extra}"
