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

Activations are quantized per tensor, or per channel (axis 1, ``channels``) where the reader
is a depthwise convolution: each output of a depthwise conv reads one input channel, so a
per-channel input step size and zero point fold into that channel's weight scale and bias
exactly, and an integer kernel stays integer (see :func:`intraq_core.quant.quantize`).

With ``learn_scale`` the stored step size Δ is an ``nn.Parameter`` trained by LSQ (Esser et
al., 2020): the straight-through estimator gives ``∂x̂/∂Δ = round(x/Δ) - x/Δ`` inside the
range and the clamp bound outside, and the gradient is scaled by ``1/sqrt(numel · qmax)``
(:func:`lsq_fake_quant`). The zero point stays fixed at its initial (integer) value.

:class:`WeightFakeQuant` also carries AdaRound's learnable rounding (``start_adaround``,
``harden``) used by block reconstruction (:mod:`intraq_core.quant.reconstruct`), and
:class:`ActFakeQuant` QDrop's random dropping of activation quantization (``drop_prob``).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor, nn

__all__ = [
    "ACT_MODES",
    "EPS",
    "RANGE_METHODS",
    "ActFakeQuant",
    "ActMode",
    "RangeMethod",
    "WeightFakeQuant",
    "affine_qparams",
    "lp_search",
    "lsq_fake_quant",
    "symmetric_qparams",
]

EPS = 1e-8
"""Smallest range width, as in the reference (keeps Δ positive for constant tensors)."""

ActMode = Literal["calibrate", "frozen", "dynamic", "off"]
ACT_MODES: tuple[str, ...] = ("calibrate", "frozen", "dynamic", "off")
RangeMethod = Literal["minmax", "lp"]
RANGE_METHODS: tuple[str, ...] = ("minmax", "lp")

#: AdaRound's rectified sigmoid stretch (Nagel et al., 2020): h(α) = clamp(σ(α)(ζ-γ)+γ, 0, 1).
ADAROUND_ZETA = 1.1
ADAROUND_GAMMA = -0.1
#: Activation values kept per calibration batch for the Lp range search of one quantizer.
LP_SAMPLES_PER_BATCH = 1 << 16
#: Shrink factors tried by the Lp search: k / LP_GRID for k = 1 … LP_GRID.
LP_GRID = 100


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer in [2, 8], got {bits!r}")
    return bits


def _check_range_method(method: str) -> str:
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


def _lsq_grad_factor(numel: int, qmax: int) -> float:
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
        self.bits = _check_bits(bits)
        self.symmetric = bool(symmetric)
        self.range_method = _check_range_method(range_method)
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
            factor = _lsq_grad_factor(weight[0].numel(), qmax)
            return lsq_fake_quant(weight, self.scale.clamp(min=EPS), self.zero_point, qmin, qmax, factor, axis=0)
        scale = torch.clamp(self.scale.detach().float(), min=EPS)
        return torch.fake_quantize_per_channel_affine(
            weight, scale, self.zero_point.round().to(torch.int32), 0, qmin, qmax
        )

    def extra_repr(self) -> str:
        extra = f", range={self.range_method}, learn_scale={self.learn_scale}" if self.stateful else ""
        return f"bits={self.bits}, symmetric={self.symmetric}{extra}"


class ActFakeQuant(nn.Module):
    """Asymmetric fake quantizer of an activation, with a calibrated range: per tensor, or per
    channel (axis 1) when ``channels`` is given (every range, step size and zero point is then a
    ``[channels]`` vector; the input must have that many channels on axis 1).

    ``mode`` (a python attribute, mirrored in the ``mode_code`` buffer so that
    ``load_state_dict`` restores it):

    - ``"calibrate"``: update the EMAs of the batch min and max,
      ``m_t = β·m_{t-1} + (1-β)·v_t`` (the uncorrected EMA is what is stored and fed back),
      and quantize the batch with the bias-corrected range ``m_t / (1 - β^t)``. For a
      constant input the corrected range equals the input's range from the first update.
      (The reference feeds the corrected value back, which overshoots ~3,900×; not done here.)
      With ``range_method="lp"`` a random sample of the batch is also kept for the search.
    - ``"frozen"``: fixed range; an error if never calibrated. With ``range_method="minmax"``
      and no learned scale it is the corrected EMA. Otherwise, on entering ``"frozen"`` after
      calibration, the step size and zero point are computed once (from the EMA range, or by
      the Lp search over the kept samples within the min/max seen) and stored in the buffers
      ``scale``/``zero_point`` (``scale`` an ``nn.Parameter`` trained by LSQ when
      ``learn_scale``).
    - ``"dynamic"``: range = the current batch's min/max (a quantized copy of the teacher
      built on the fly, e.g. the student of DeepInversion's ADI term); EMAs untouched.
    - ``"off"``: identity.

    ``signed`` False (the output of a ReLU/ReLU6) fixes the lower end of the range at 0: an
    unsigned grid ``[0, b]`` with zero point 0 (a negative input clamps to 0). ``signed`` True
    (SiLU, GELU, hardswish, the network input, residual sums) keeps the observed minimum: the
    asymmetric grid ``[min(a, 0), max(b, 0)]``. ``drop_prob`` > 0 (QDrop, used during block
    reconstruction) passes each element through unquantized with that probability.
    """

    ema_min: Tensor
    ema_max: Tensor
    num_updates: Tensor
    mode_code: Tensor

    def __init__(
        self,
        bits: int,
        ema_decay: float = 0.9,
        mode: ActMode = "calibrate",
        *,
        range_method: RangeMethod = "minmax",
        lp_norm: float = 2.4,
        learn_scale: bool = False,
        signed: bool = True,
        channels: int | None = None,
    ) -> None:
        super().__init__()
        self.bits = _check_bits(bits)
        self.signed = bool(signed)
        if channels is not None and (isinstance(channels, bool) or int(channels) < 1):
            raise ValueError(f"channels must be a positive integer or None, got {channels!r}")
        #: Number of channels (axis 1) of a per-channel quantizer; None for per tensor.
        self.channels = None if channels is None else int(channels)
        shape = () if self.channels is None else (self.channels,)
        if not 0.0 < float(ema_decay) < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {ema_decay!r}")
        self.ema_decay = float(ema_decay)
        self.range_method = _check_range_method(range_method)
        self.lp_norm = float(lp_norm)
        self.learn_scale = bool(learn_scale)
        self.stateful = self.range_method != "minmax" or self.learn_scale
        self.register_buffer("ema_min", torch.zeros(shape, dtype=torch.float32))
        self.register_buffer("ema_max", torch.zeros(shape, dtype=torch.float32))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.int64))
        self.register_buffer("mode_code", torch.zeros((), dtype=torch.int64))
        if self.stateful:
            if self.learn_scale:
                self.scale = nn.Parameter(torch.ones(shape, dtype=torch.float32))
            else:
                self.register_buffer("scale", torch.ones(shape, dtype=torch.float32))
            self.register_buffer("zero_point", torch.zeros(shape, dtype=torch.float32))
        self.drop_prob = 0.0
        #: Seeded generator of QDrop's masks (set by block reconstruction, so that its result
        #: depends on its seed only, not on what else drew from torch's global RNG before).
        self.drop_generator: torch.Generator | None = None
        self._samples: list[Tensor] = []
        self._seen: tuple[Tensor, Tensor] | None = None
        self._sample_gen: torch.Generator | None = None
        self._calibrated = False
        self._mode: str = "calibrate"
        self.mode = mode

    @property
    def quant_min(self) -> int:
        return 0

    @property
    def quant_max(self) -> int:
        return 2**self.bits - 1

    @property
    def axis(self) -> int | None:
        """The channel axis of a per-channel quantizer (1), None per tensor."""
        return None if self.channels is None else 1

    @property
    def calibrated(self) -> bool:
        """Whether the EMA range has seen at least one batch."""
        return self._calibrated

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        if mode not in ACT_MODES:
            raise ValueError(f"unknown activation quantizer mode {mode!r}; expected one of {ACT_MODES}")
        if mode == "frozen" and not self._calibrated:
            raise RuntimeError(
                "cannot freeze an activation quantizer that was never calibrated: run forward "
                "passes in mode 'calibrate' first (see intraq_core.quant.calibrate_ranges)"
            )
        if mode == "frozen" and self._mode == "calibrate" and self.stateful and self._seen is not None:
            self._store_range()
        self._mode = mode
        self.mode_code.fill_(ACT_MODES.index(mode))

    def reset(self) -> None:
        """Forget the calibrated range (EMAs, update count, samples) and go back to ``"calibrate"``."""
        self.ema_min.zero_()
        self.ema_max.zero_()
        self.num_updates.zero_()
        self._samples = []
        self._seen = None
        self._calibrated = False
        self.mode = "calibrate"

    def ema_range(self) -> tuple[Tensor, Tensor]:
        """Bias-corrected EMA range ``(a, b)`` as float32 scalars (``[channels]`` vectors per channel)."""
        if not self._calibrated:
            raise RuntimeError("activation quantizer has no calibrated range (never run in 'calibrate')")
        correction = 1.0 - torch.pow(self.ema_decay, self.num_updates.float())
        lo, hi = self.ema_min.float() / correction, self.ema_max.float() / correction
        if not self.signed:
            lo = torch.zeros_like(lo)
        return lo, hi

    def range(self) -> tuple[Tensor, Tensor]:
        """The quantization range ``(a, b)`` as float32 scalars or ``[channels]`` vectors (before
        extending to 0).

        The stored range once frozen (stateful quantizers), else the bias-corrected EMA range.
        """
        if self.stateful and self._mode != "calibrate" and self._calibrated:
            scale, zp = self.scale.detach().float(), self.zero_point.float()
            return -zp * scale, (self.quant_max - zp) * scale
        return self.ema_range()

    def qparams(self) -> tuple[Tensor, Tensor]:
        """``(scale, zero_point int32)`` of the calibrated range (used by export)."""
        if self.stateful and self._mode != "calibrate" and self._calibrated:
            return torch.clamp(self.scale.detach().float(), min=EPS), self.zero_point.round().to(torch.int32)
        lo, hi = self.ema_range()
        return affine_qparams(lo, hi, self.bits)

    def _check_channels(self, x: Tensor) -> None:
        """A per-channel quantizer's input must have its channels on axis 1 (checked by ``forward``)."""
        if self.channels is not None and (x.dim() < 2 or x.shape[1] != self.channels):
            raise ValueError(
                f"per-channel activation quantizer of {self.channels} channels got a tensor of shape {tuple(x.shape)}"
            )

    def _rows(self, x: Tensor) -> Tensor:
        """``x`` as one row (per tensor) or one row per channel ``[C, N·H·W]`` (per channel)."""
        if self.channels is None:
            return x.reshape(1, -1)
        return x.transpose(0, 1).reshape(self.channels, -1)

    @torch.no_grad()
    def _observe(self, x: Tensor) -> None:
        rows = self._rows(x.detach())
        lo, hi = torch.aminmax(rows, dim=1)
        if self.channels is None:
            lo, hi = lo[0], hi[0]
        beta = self.ema_decay
        self.ema_min.mul_(beta).add_(lo.float(), alpha=1.0 - beta)
        self.ema_max.mul_(beta).add_(hi.float(), alpha=1.0 - beta)
        self.num_updates.add_(1)
        if self.stateful:
            seen = (lo.float().cpu(), hi.float().cpu())
            if self._seen is not None:
                seen = (torch.minimum(self._seen[0], seen[0]), torch.maximum(self._seen[1], seen[1]))
            self._seen = seen
            if self.range_method == "lp":
                flat = rows.float()
                per_row = LP_SAMPLES_PER_BATCH // flat.shape[0]
                if flat.shape[1] > per_row:
                    if self._sample_gen is None:
                        self._sample_gen = torch.Generator(device="cpu").manual_seed(0)
                    idx = torch.randint(flat.shape[1], (per_row,), generator=self._sample_gen)
                    flat = flat[:, idx.to(flat.device)]
                self._samples.append(flat.cpu())
        if not self._calibrated:
            self._calibrated = True

    @torch.no_grad()
    def _store_range(self) -> None:
        """Compute the frozen step size and zero point (EMA range, or Lp search on the samples)."""
        if self.range_method == "lp" and self._samples:
            values = torch.cat(self._samples, dim=1)
            assert self._seen is not None
            lo_seen, hi_seen = self._seen
            if not self.signed:
                lo_seen = torch.zeros_like(lo_seen)
                values = values.clamp(min=0.0)
            # The search starts from the widest range seen, which the samples may miss.
            lo, hi = lp_search(values, self.bits, p=self.lp_norm, start=(lo_seen, hi_seen))
            if self.channels is None:
                lo, hi = lo[0], hi[0]
        else:
            lo, hi = self.ema_range()
        scale, zero_point = affine_qparams(lo, hi, self.bits)
        self.scale.copy_(scale.to(self.scale.device))
        self.zero_point.copy_(zero_point.float().to(self.zero_point.device))
        self._samples = []
        self._seen = None

    def forward(self, x: Tensor) -> Tensor:
        mode = self._mode
        if mode == "off":
            return x
        self._check_channels(x)
        if mode == "dynamic":
            lo, hi = torch.aminmax(self._rows(x.detach()), dim=1)
            scale, zero_point = affine_qparams(lo if self.signed else torch.zeros_like(lo), hi, self.bits)
            if self.channels is None:
                scale, zero_point = scale[0], zero_point[0]
            return self._fake_quant(x, scale, zero_point)
        if mode == "calibrate":
            self._observe(x)
        if mode == "frozen" and self.learn_scale and torch.is_grad_enabled() and self.scale.requires_grad:
            per_sample = x[0].numel() if x.dim() > 1 else x.numel()
            factor = _lsq_grad_factor(per_sample // (self.channels or 1), self.quant_max)
            out = lsq_fake_quant(
                x, self.scale.clamp(min=EPS), self.zero_point, self.quant_min, self.quant_max, factor, axis=self.axis
            )
        else:
            scale, zero_point = self.qparams()
            out = self._fake_quant(x, scale, zero_point)
        if self.drop_prob > 0.0:  # QDrop: keep each element in float with probability drop_prob
            if self.drop_generator is not None:
                noise = torch.rand(x.shape, generator=self.drop_generator, device=self.drop_generator.device)
                keep_float = (noise.to(x.device) < self.drop_prob).to(x.dtype)
            else:
                keep_float = (torch.rand_like(x) < self.drop_prob).to(x.dtype)
            out = torch.lerp(out, x, keep_float)  # several times faster than torch.where on CPU
        return out

    def _fake_quant(self, x: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
        if self.channels is None:
            return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, self.quant_min, self.quant_max)
        return torch.fake_quantize_per_channel_affine(x, scale, zero_point, 1, self.quant_min, self.quant_max)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """Load the buffers, then re-derive the python-side ``mode`` and ``calibrated`` flag."""
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self._calibrated = bool(self.num_updates.item() > 0)
        self._samples = []
        self._seen = None
        code = int(self.mode_code.item())
        if not 0 <= code < len(ACT_MODES):
            raise RuntimeError(f"invalid activation quantizer mode code {code} in state dict at '{prefix}'")
        self.mode = ACT_MODES[code]

    def extra_repr(self) -> str:
        extra = f", range={self.range_method}, learn_scale={self.learn_scale}" if self.stateful else ""
        grid = f"signed={self.signed}" + ("" if self.channels is None else f", channels={self.channels}")
        return f"bits={self.bits}, {grid}, ema_decay={self.ema_decay}, mode={self._mode}{extra}"
