"""Fake quantization of CNN classifiers: quantizer primitives and the ``quantize`` verb."""

from intraq_core.quant.api import (
    QuantConv2d,
    QuantLinear,
    act_quantizers,
    calibrate,
    quant_summary,
    quantize,
    set_act_mode,
    weight_quantized_layers,
)
from intraq_core.quant.quantizer import (
    ACT_MODES,
    ActFakeQuant,
    ActMode,
    WeightFakeQuant,
    affine_qparams,
    symmetric_qparams,
)

__all__ = [
    "ACT_MODES",
    "ActFakeQuant",
    "ActMode",
    "QuantConv2d",
    "QuantLinear",
    "WeightFakeQuant",
    "act_quantizers",
    "affine_qparams",
    "calibrate",
    "quant_summary",
    "quantize",
    "set_act_mode",
    "symmetric_qparams",
    "weight_quantized_layers",
]
