"""Fake quantization of CNN classifiers: quantizer primitives, the ``quantize`` verb and SQuant."""

from intraq_core.quant.act_quantizer import ACT_MODES, ActFakeQuant, ActMode
from intraq_core.quant.api import QuantizationWarning, quantize
from intraq_core.quant.calibration import calibrate_ranges, is_step_size, set_act_mode, set_step_size_training
from intraq_core.quant.layers import QuantConv1d, QuantConv2d, QuantLinear, act_quantizers, weight_quantized_layers
from intraq_core.quant.quantizer import WeightFakeQuant, affine_qparams, symmetric_qparams
from intraq_core.quant.squant import SQuantReport, squant_
from intraq_core.quant.summary import format_quant_map, quant_map, quant_summary

__all__ = [
    "ACT_MODES",
    "ActFakeQuant",
    "ActMode",
    "QuantConv1d",
    "QuantConv2d",
    "QuantLinear",
    "QuantizationWarning",
    "SQuantReport",
    "WeightFakeQuant",
    "act_quantizers",
    "affine_qparams",
    "calibrate_ranges",
    "format_quant_map",
    "is_step_size",
    "quant_map",
    "quant_summary",
    "quantize",
    "set_act_mode",
    "set_step_size_training",
    "squant_",
    "symmetric_qparams",
    "weight_quantized_layers",
]
