"""The student as it is exported: a frozen copy whose every quantizer is a fixed-parameter fake-quant site.

:func:`frozen_copy` freezes the activation ranges; :func:`export_copy` replaces each weight and activation
quantizer by a site (:class:`QDQSite`) that traces to one ``intraq::FakeQuant`` ONNX placeholder (lowered to
Q/Clip/DQ by :mod:`intraq_core.deploy_onnx`) or, for ``torch.export``, to elementary ops. Either way the copy
computes exactly what the student computes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from intraq_core.errors import ExportError
from intraq_core.quant.layers import act_quantizers, weight_quantized_layers
from intraq_core.quant.quantizer import WeightFakeQuant

__all__ = ["PLACEHOLDER_DOMAIN", "PLACEHOLDER_OP", "QDQSite", "export_copy", "frozen_copy"]

PLACEHOLDER_DOMAIN = "intraq"
PLACEHOLDER_OP = "FakeQuant"


@dataclass(frozen=True)
class QDQSite:
    """One fake-quant site of the student and how it is encoded in ONNX."""

    name: str
    kind: str  # "weight" or "activation"
    bits: int
    quant_min: int
    quant_max: int
    axis: int  # 0 for per-output-channel weights, 1 for per-channel activations, -1 for per tensor
    channels: int  # number of scales (1 for per-tensor)


def frozen_copy(student: nn.Module) -> nn.Module:
    """A deep copy in eval mode whose activation quantizers are frozen (what gets exported).

    Quantizers still in ``calibrate`` mode are frozen at their calibrated range; ``off`` ones
    stay identities. ``dynamic`` quantizers (range from each batch) and uncalibrated ones cannot
    be expressed with fixed Q/DQ parameters: ExportError.
    """
    model = copy.deepcopy(student).eval()
    quants = act_quantizers(model)
    if not quants and not weight_quantized_layers(model):
        raise ExportError("the model has no fake-quant modules; export a student built by quantize()")
    for name, q in quants.items():
        if q.mode == "dynamic":
            raise ExportError(f"activation quantizer {name} is in mode 'dynamic'; freeze its range first")
        if q.mode == "calibrate":
            if not q.calibrated:
                raise ExportError(f"activation quantizer {name} was never calibrated")
            q.mode = "frozen"
    return model.requires_grad_(False)


class _FakeQuantFn(torch.autograd.Function):
    """Fake quantization whose ONNX symbolic is one ``intraq::FakeQuant`` placeholder node.

    ``forward`` is PyTorch's own fused fake-quant op (so the export copy computes exactly what
    the student computes); the scale and zero point also travel as Python lists so the symbolic
    can store them as node attributes for :func:`lower_fake_quant`.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor,
        site: QDQSite,
        scales: list[float],
        zero_points: list[int],
    ) -> torch.Tensor:
        if site.axis < 0:
            return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, site.quant_min, site.quant_max)
        return torch.fake_quantize_per_channel_affine(x, scale, zero_point, site.axis, site.quant_min, site.quant_max)

    @staticmethod
    def symbolic(
        g: Any,
        x: Any,
        scale: Any,
        zero_point: Any,
        site: QDQSite,
        scales: list[float],
        zero_points: list[int],
    ) -> Any:
        out = g.op(
            f"{PLACEHOLDER_DOMAIN}::{PLACEHOLDER_OP}",
            x,
            site_s=site.name,
            kind_s=site.kind,
            bits_i=site.bits,
            quant_min_i=site.quant_min,
            quant_max_i=site.quant_max,
            axis_i=site.axis,
            scale_f=scales,
            zero_point_i=zero_points,
        )
        out.setType(x.type())  # Conv needs the (weight) shape downstream
        return out


class _ExportFakeQuant(nn.Module):
    """A fake-quant site with fixed parameters, standing in for a weight or activation quantizer."""

    scale: torch.Tensor
    zero_point: torch.Tensor

    def __init__(self, site: QDQSite, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        super().__init__()
        self.site = site
        self.register_buffer("scale", scale.detach().float().reshape(-1).clone())
        self.register_buffer("zero_point", zero_point.detach().to(torch.int32).reshape(-1).clone())
        self._scales = [float(v) for v in self.scale.tolist()]
        self._zero_points = [int(v) for v in self.zero_point.tolist()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale if self.site.axis >= 0 else self.scale[0]
        zero_point = self.zero_point if self.site.axis >= 0 else self.zero_point[0]
        return _FakeQuantFn.apply(x, scale, zero_point, self.site, self._scales, self._zero_points)


class _ExplicitFakeQuant(nn.Module):
    """A fixed-parameter fake-quant site written with elementary ops, for ``torch.export``.

    ``torch.export`` cannot trace PyTorch's fused fake-quant ops (they have no meta kernel).
    This computes the same float32 arithmetic as their CPU kernels,
    ``(clamp(round(x·(1/Δ)) + zp, qmin, qmax) - zp)·Δ`` with ``1/Δ`` rounded to float32 and
    round-half-to-even, so the exported program matches the student bit for bit.
    """

    scale: torch.Tensor
    inv_scale: torch.Tensor
    zero_point: torch.Tensor

    def __init__(self, site: QDQSite, scale: torch.Tensor, zero_point: torch.Tensor, ndim: int) -> None:
        super().__init__()
        self.site = site
        # Per axis: [C, 1, ...] broadcasts from axis 0 (a weight of ``ndim`` dims); an activation
        # (axis 1) is reshaped to its input's rank in ``forward``.
        shape = (-1, *([1] * (ndim - 1))) if site.axis >= 0 else ()
        scale = scale.detach().float().reshape(shape).clone()
        self.register_buffer("scale", scale)
        self.register_buffer("inv_scale", 1.0 / scale)
        self.register_buffer("zero_point", zero_point.detach().float().reshape(shape).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, inv_scale, zero_point = self.scale, self.inv_scale, self.zero_point
        if self.site.axis > 0:
            shape = (-1, *([1] * (x.dim() - self.site.axis - 1)))
            scale, inv_scale, zero_point = scale.reshape(shape), inv_scale.reshape(shape), zero_point.reshape(shape)
        q = torch.round(x * inv_scale) + zero_point
        q = torch.clamp(q, self.site.quant_min, self.site.quant_max)
        return (q - zero_point) * scale


def export_copy(student: nn.Module, *, explicit: bool = False) -> tuple[nn.Module, list[QDQSite]]:
    """The frozen student with every quantizer replaced by a fixed-parameter site.

    Weights are replaced by their fake-quantized values (qparams computed from the trained
    weights first), so the copy computes exactly what the student computes. Sites trace to ONNX
    placeholders (default) or, with ``explicit``, to elementary ops (for ``torch.export``).
    """
    model = frozen_copy(student)
    sites: list[QDQSite] = []
    layers = weight_quantized_layers(model)

    def make(site: QDQSite, scale: torch.Tensor, zero_point: torch.Tensor, ndim: int) -> nn.Module:
        if explicit:
            return _ExplicitFakeQuant(site, scale, zero_point, ndim)
        return _ExportFakeQuant(site, scale, zero_point)

    with torch.no_grad():
        qparams = {name: layer.weight_quant.qparams(layer.weight) for name, layer in layers.items()}
        for name, layer in layers.items():
            scale, zero_point, qmin, qmax = qparams[name]
            quantizer: WeightFakeQuant = layer.weight_quant
            site = QDQSite(f"{name}.weight", "weight", quantizer.bits, qmin, qmax, 0, int(scale.numel()))
            snapped = torch.fake_quantize_per_channel_affine(layer.weight, scale, zero_point, 0, qmin, qmax)
            layer.weight.copy_(snapped)
            layer.weight_quant = make(site, scale, zero_point, layer.weight.dim())
            sites.append(site)
        for name, quant in act_quantizers(model).items():
            if quant.mode == "off":
                continue
            scale, zero_point = quant.qparams()
            axis = -1 if quant.axis is None else quant.axis
            site = QDQSite(name, "activation", quant.bits, quant.quant_min, quant.quant_max, axis, int(scale.numel()))
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, make(site, scale, zero_point, 0))
            sites.append(site)
    return model, sites
