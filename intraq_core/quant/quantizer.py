"""Fake-quantization primitives: uniform affine quantizers with a straight-through gradient.

Math (standard affine form, equivalent to the reference's ``s = (2^k-1)/(b-a)``,
``z = round(s·a) + 2^(k-1)`` form): the range ``[a, b]`` is first extended to include 0
(``a = min(a, 0)``, ``b = max(b, 0)``) so that zero is exactly representable and the zero
point stays in ``[0, 2^k - 1]``; then

    Δ  = max(b - a, eps) / (2^k - 1)
    zp = clamp(round(-a / Δ), 0, 2^k - 1)
    x̂  = (clamp(round(x / Δ) + zp, 0, 2^k - 1) - zp) · Δ

Rounding is round-half-to-even (``torch.round``). The quantizers call PyTorch's fused
``torch.fake_quantize_per_channel_affine`` / ``torch.fake_quantize_per_tensor_affine``,
which compute exactly this and pass the gradient straight through inside the clamp range
(zero outside it). This differs from the reference, whose STE passes the gradient
everywhere; for weights it makes no difference (their range is their own min/max).

Ranges and zero points are never differentiated (no learned clipping, as in the reference).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

__all__ = [
    "ACT_MODES",
    "EPS",
    "ActFakeQuant",
    "ActMode",
    "WeightFakeQuant",
    "affine_qparams",
    "symmetric_qparams",
]

EPS = 1e-8
"""Smallest range width, as in the reference (keeps Δ positive for constant tensors)."""

ActMode = Literal["calibrate", "frozen", "dynamic", "off"]
ACT_MODES: tuple[str, ...] = ("calibrate", "frozen", "dynamic", "off")


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer in [2, 8], got {bits!r}")
    return bits


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


class WeightFakeQuant(nn.Module):
    """Per-output-channel (axis 0) fake quantizer of a weight tensor.

    The range of each output channel is the min/max (or ±max|w| when ``symmetric``) of the
    current weight, recomputed at every forward, so the module holds no state and follows
    the weights while they are being fine-tuned (as in the reference).
    """

    def __init__(self, bits: int, symmetric: bool = False) -> None:
        super().__init__()
        self.bits = _check_bits(bits)
        self.symmetric = bool(symmetric)

    @property
    def quant_min(self) -> int:
        return -(2 ** (self.bits - 1) - 1) if self.symmetric else 0

    @property
    def quant_max(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    def qparams(self, weight: Tensor) -> tuple[Tensor, Tensor, int, int]:
        """``(scale[C], zero_point[C] int32, quant_min, quant_max)`` of ``weight`` (used by export)."""
        flat = weight.detach().reshape(weight.shape[0], -1)
        if self.symmetric:
            scale, zero_point = symmetric_qparams(flat.abs().amax(dim=1), self.bits)
        else:
            lo, hi = torch.aminmax(flat, dim=1)
            scale, zero_point = affine_qparams(lo, hi, self.bits)
        return scale, zero_point, self.quant_min, self.quant_max

    def forward(self, weight: Tensor) -> Tensor:
        scale, zero_point, qmin, qmax = self.qparams(weight)
        return torch.fake_quantize_per_channel_affine(weight, scale, zero_point, 0, qmin, qmax)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, symmetric={self.symmetric}"


class ActFakeQuant(nn.Module):
    """Per-tensor asymmetric fake quantizer of an activation, with an EMA-calibrated range.

    ``mode`` (a python attribute, mirrored in the ``mode_code`` buffer so that
    ``load_state_dict`` restores it):

    - ``"calibrate"``: update the EMAs of the batch min and max,
      ``m_t = β·m_{t-1} + (1-β)·v_t`` (the uncorrected EMA is what is stored and fed back),
      and quantize the batch with the bias-corrected range ``m_t / (1 - β^t)``. For a
      constant input the corrected range equals the input's range from the first update.
      (The reference feeds the corrected value back, which overshoots ~3,900×; not done here.)
    - ``"frozen"``: fixed range = the corrected EMA; an error if never calibrated.
    - ``"dynamic"``: range = the current batch's min/max (a quantized copy of the teacher
      built on the fly, e.g. the student of DeepInversion's ADI term); EMAs untouched.
    - ``"off"``: identity.

    ``signed`` False (the output of a ReLU/ReLU6) fixes the lower end of the range at 0: an
    unsigned grid ``[0, b]`` with zero point 0 (a negative input clamps to 0). ``signed`` True
    (SiLU, GELU, hardswish, the network input, residual sums) keeps the observed minimum: the
    asymmetric grid ``[min(a, 0), max(b, 0)]``.
    """

    ema_min: Tensor
    ema_max: Tensor
    num_updates: Tensor
    mode_code: Tensor

    def __init__(self, bits: int, ema_decay: float = 0.9, mode: ActMode = "calibrate", signed: bool = True) -> None:
        super().__init__()
        self.bits = _check_bits(bits)
        self.signed = bool(signed)
        if not 0.0 < float(ema_decay) < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {ema_decay!r}")
        self.ema_decay = float(ema_decay)
        self.register_buffer("ema_min", torch.zeros((), dtype=torch.float32))
        self.register_buffer("ema_max", torch.zeros((), dtype=torch.float32))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.int64))
        self.register_buffer("mode_code", torch.zeros((), dtype=torch.int64))
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
                "passes in mode 'calibrate' first (see intraq_core.quant.calibrate)"
            )
        self._mode = mode
        self.mode_code.fill_(ACT_MODES.index(mode))

    def reset(self) -> None:
        """Forget the calibrated range (EMAs and update count) and go back to ``"calibrate"``."""
        self.ema_min.zero_()
        self.ema_max.zero_()
        self.num_updates.zero_()
        self._calibrated = False
        self.mode = "calibrate"

    def range(self) -> tuple[Tensor, Tensor]:
        """Bias-corrected EMA range ``(a, b)`` as float32 scalars (before extending to 0)."""
        if not self._calibrated:
            raise RuntimeError("activation quantizer has no calibrated range (never run in 'calibrate')")
        correction = 1.0 - torch.pow(self.ema_decay, self.num_updates.float())
        return self.ema_min.float() / correction, self.ema_max.float() / correction

    def qparams(self) -> tuple[Tensor, Tensor]:
        """``(scale, zero_point int32)`` of the calibrated range (used by export)."""
        lo, hi = self.range()
        return affine_qparams(lo if self.signed else torch.zeros_like(lo), hi, self.bits)

    @torch.no_grad()
    def _observe(self, x: Tensor) -> None:
        lo, hi = torch.aminmax(x.detach())
        beta = self.ema_decay
        self.ema_min.mul_(beta).add_(lo.float(), alpha=1.0 - beta)
        self.ema_max.mul_(beta).add_(hi.float(), alpha=1.0 - beta)
        self.num_updates.add_(1)
        if not self._calibrated:
            self._calibrated = True

    def forward(self, x: Tensor) -> Tensor:
        mode = self._mode
        if mode == "off":
            return x
        if mode == "dynamic":
            lo, hi = torch.aminmax(x.detach())
            scale, zero_point = affine_qparams(lo if self.signed else torch.zeros_like(lo), hi, self.bits)
        else:
            if mode == "calibrate":
                self._observe(x)
            scale, zero_point = self.qparams()
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, self.quant_min, self.quant_max)

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
        code = int(self.mode_code.item())
        if not 0 <= code < len(ACT_MODES):
            raise RuntimeError(f"invalid activation quantizer mode code {code} in state dict at '{prefix}'")
        self.mode = ACT_MODES[code]

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}, ema_decay={self.ema_decay}, mode={self._mode}"
