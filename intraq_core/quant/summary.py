"""What :func:`intraq_core.quant.quantize` made of a model, for people: the quantization map it records
(:func:`quant_map`, :func:`format_quant_map`) and one row per quantizer with its range and step
(:func:`quant_summary`)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from intraq_core.quant.layers import QuantConv1d, QuantConv2d, act_quantizers, weight_quantized_layers

__all__ = ["MAP_KEY", "format_quant_map", "quant_map", "quant_summary"]

#: Key of the quantization map in the student's ``GraphModule.meta`` (kept by ``deepcopy``).
MAP_KEY = "intraq_quant_map"


def quant_map(model: nn.Module) -> dict[str, Any]:
    """What :func:`intraq_core.quant.quantize` did to a model: a JSON-ready dict.

    ``placement``; ``weight_layers``: ``quantized`` (count), ``bits`` (count per bit width),
    ``float`` (``name`` and ``reason`` of every conv/linear left float); ``activations``:
    ``quantized``, ``bits``, ``signed``/``unsigned`` counts, ``per_channel`` (how many have one
    range per channel: inputs read only by depthwise convs), ``image`` (whether the input
    image is quantized); ``layer_inputs``: per weight layer in execution order, its ``bits``
    and what its ``input`` is (``act_quant.<node> (4-bit, signed)``, the image, or float).
    """
    meta = getattr(model, "meta", None)
    if not isinstance(meta, dict) or MAP_KEY not in meta:
        raise ValueError(f"{type(model).__name__} was not built by intraq_core.quant.quantize(): no quantization map")
    return copy.deepcopy(meta[MAP_KEY])


def format_quant_map(qmap: dict[str, Any], *, layers: bool = True) -> str:
    """The quantization map as text for a terminal or a log (one summary line, then one per layer)."""
    w, a = qmap["weight_layers"], qmap["activations"]
    bits = lambda d: ", ".join(f"{n} at {b}-bit" for b, n in d.items()) or "none"  # noqa: E731
    per_channel = f"; {a['per_channel']} per channel (depthwise inputs)" if a.get("per_channel") else ""
    lines = [
        f"weights: {w['quantized']} layer(s) quantized ({bits(w['bits'])}), {len(w['float'])} left float; "
        f"activations: {a['quantized']} tensor(s) quantized ({bits(a['bits'])}; {a['unsigned']} unsigned, "
        f"{a['signed']} signed{per_channel}), placement {qmap['placement']}"
    ]
    lines += [f"  float: {r['name']}: {r['reason']}" for r in w["float"]]
    if layers:
        lines += [f"  {r['layer']} (W{r['bits']}): input {r['input']}" for r in qmap["layer_inputs"]]
    return "\n".join(lines)


def quant_summary(model: nn.Module) -> list[dict[str, Any]]:
    """One row per quantizer, for reports.

    Keys: ``name``, ``kind`` (``conv2d``, ``linear`` or ``act``), ``bits``, ``range``
    (weights: overall min/max of the float weight; activations: corrected EMA range, None if
    uncalibrated) and ``scale`` (weights: mean per-channel Δ; activations: Δ or None).
    Weight rows add ``symmetric``; activation rows add ``mode`` and ``updates``.
    """
    rows: list[dict[str, Any]] = []
    with torch.no_grad():
        for name, layer in weight_quantized_layers(model).items():
            weight = layer.weight
            scale = layer.weight_quant.qparams(weight)[0]
            rows.append(
                {
                    "name": name,
                    "kind": "conv2d"
                    if isinstance(layer, QuantConv2d)
                    else ("conv1d" if isinstance(layer, QuantConv1d) else "linear"),
                    "bits": layer.weight_quant.bits,
                    "symmetric": layer.weight_quant.symmetric,
                    "range": (float(weight.min()), float(weight.max())),
                    "scale": float(scale.mean()),
                }
            )
        for name, quant in act_quantizers(model).items():
            row: dict[str, Any] = {
                "name": name,
                "kind": "act",
                "bits": quant.bits,
                "signed": quant.signed,
                "mode": quant.mode,
                "updates": int(quant.num_updates),
                "range": None,
                "scale": None,
            }
            if quant.channels is not None:
                row["channels"] = quant.channels
            if quant.calibrated:  # per channel: the widest range and the mean step
                lo, hi = quant.range()
                row["range"] = (float(lo.min()), float(hi.max()))
                row["scale"] = float(quant.qparams()[0].mean())
            rows.append(row)
    return rows
