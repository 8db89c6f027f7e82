"""The activation quantizer (:class:`ActFakeQuant`): asymmetric, with a calibrated range (EMA min/max, or an
Lp search over kept samples), unsigned after a ReLU, an LSQ-trained step, and QDrop's random dropping of
quantization (``drop_prob``). The grid it quantizes onto is :mod:`intraq_core.quant.quantizer`'s.

Activations are quantized per tensor, or per channel (axis 1, ``channels``) where the reader
is a depthwise convolution: each output of a depthwise conv reads one input channel, so a
per-channel input step size and zero point fold into that channel's weight scale and bias
exactly, and an integer kernel stays integer (see :func:`intraq_core.quant.quantize`).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from intraq_core.quant.quantizer import (
    EPS,
    RangeMethod,
    affine_qparams,
    check_bits,
    check_range_method,
    lp_search,
    lsq_fake_quant,
    lsq_grad_factor,
)

__all__ = ["ACT_MODES", "LP_SAMPLES_PER_BATCH", "ActFakeQuant", "ActMode"]

ActMode = Literal["calibrate", "frozen", "dynamic", "off"]
ACT_MODES: tuple[str, ...] = ("calibrate", "frozen", "dynamic", "off")
#: Activation values kept per calibration batch for the Lp range search of one quantizer.
LP_SAMPLES_PER_BATCH = 1 << 16


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
        self.bits = check_bits(bits)
        self.signed = bool(signed)
        if channels is not None and (isinstance(channels, bool) or int(channels) < 1):
            raise ValueError(f"channels must be a positive integer or None, got {channels!r}")
        #: Number of channels (axis 1) of a per-channel quantizer; None for per tensor.
        self.channels = None if channels is None else int(channels)
        shape = () if self.channels is None else (self.channels,)
        if not 0.0 < float(ema_decay) < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {ema_decay!r}")
        self.ema_decay = float(ema_decay)
        self.range_method = check_range_method(range_method)
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
            factor = lsq_grad_factor(per_sample // (self.channels or 1), self.quant_max)
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
