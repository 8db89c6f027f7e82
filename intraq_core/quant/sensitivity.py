"""Which activation tensors the student's bit width hurts most: each quantizer alone, data-free.

One activation quantizer on at a time (its calibrated range, its bits), every other one off and the
weights float: the KL divergence of the student's predictions from the teacher's on synthetic images
is what that one tensor costs. A network whose cost concentrates in one or two tensors (MobileNetV1
x0.25's 8-channel stem output: KL 0.39 against <= 0.025 for 25 of its 27 tensors at 4 bits) has a
bottleneck that no range rule or reconstruction budget removes; the run reports the ranking so the
user sees it (and can keep that tensor at more bits) before spending the distillation budget.

    >>> import torch, torch.nn as nn
    >>> from intraq_core.config import QuantConfig
    >>> from intraq_core.quant import calibrate_ranges, quantize
    >>> layers = [nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)]
    >>> teacher = nn.Sequential(*layers).eval()
    >>> student = quantize(teacher, QuantConfig(w_bits=4, a_bits=4))
    >>> _ = calibrate_ranges(student, [torch.randn(8, 3, 8, 8)])
    >>> rows = activation_sensitivity(teacher, student, torch.randn(8, 3, 8, 8))
    >>> [sorted(r) for r in rows][:1]
    [['agreement', 'bits', 'kl', 'name']]
"""

from __future__ import annotations

import statistics
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from intraq_core.quant.layers import act_quantizers, weight_quantized_layers

__all__ = ["SENSITIVITY_KEY", "activation_sensitivity", "format_sensitivity", "recorded_sensitivity"]

#: Key of the rows :func:`intraq_core.quant.methods.run_calibration` records in the student's
#: ``GraphModule.meta`` (kept by ``deepcopy``), for the run's metrics.
SENSITIVITY_KEY = "intraq_act_sensitivity"
#: Images the calibration step scores the ranking on (the first calibration batch, at most this many).
SENSITIVITY_IMAGES = 64


@torch.no_grad()
def activation_sensitivity(teacher: nn.Module, student: nn.Module, images: Tensor) -> list[dict[str, Any]]:
    """Per activation quantizer (calibrated), what it costs alone on ``images``, most costly first.

    Rows: ``name``, ``bits``, ``kl`` (KL(teacher ‖ student) of the softmax outputs, batch mean) and
    ``agreement`` (top-1 agreement with the teacher, %). Weights are float and every other
    activation quantizer off while a row is measured; the student's quantizer modes, weight
    quantizers and train/eval mode are as before afterwards.
    """
    quants = act_quantizers(student)
    weights = [layer.weight_quant for layer in weight_quantized_layers(student).values()]
    modes = {name: q.mode for name, q in quants.items()}
    enabled = [w.enabled for w in weights]
    training = student.training
    rows: list[dict[str, Any]] = []
    try:
        student.eval()
        for w in weights:
            w.enabled = False
        for q in quants.values():
            q.mode = "off"
        target = teacher(images).float().log_softmax(1)
        for name, q in quants.items():
            if not q.calibrated:
                continue
            q.mode = "frozen"
            pred = student(images).float().log_softmax(1)
            q.mode = "off"
            kl = F.kl_div(pred, target, log_target=True, reduction="batchmean")
            agreement = (pred.argmax(1) == target.argmax(1)).float().mean() * 100.0
            rows.append({"name": name, "bits": int(q.bits), "kl": float(kl), "agreement": float(agreement)})
    finally:
        for name, q in quants.items():
            q.mode = modes[name]
        for w, on in zip(weights, enabled, strict=True):
            w.enabled = on
        student.train(training)
    return sorted(rows, key=lambda r: -r["kl"])


def format_sensitivity(rows: list[dict[str, Any]], top: int = 3) -> str:
    """The ``top`` most costly tensors and how far the first stands above the median, in one line."""
    if not rows:
        return "no calibrated activation quantizer"
    median = statistics.median(r["kl"] for r in rows)
    head = "; ".join(
        f"{r['name']} (A{r['bits']}): KL {r['kl']:.3f}, agreement {r['agreement']:.0f}%" for r in rows[:top]
    )
    ratio = f"{rows[0]['kl'] / median:.0f}x the median" if median > 0 else "the median is 0"
    return f"{head}; median KL {median:.3f} over {len(rows)} tensors (the first is {ratio})"


def recorded_sensitivity(student: nn.Module) -> list[dict[str, Any]] | None:
    """The ranking the calibration step recorded on ``student`` (None: none was measured)."""
    meta = getattr(student, "meta", None)
    rows = meta.get(SENSITIVITY_KEY) if isinstance(meta, dict) else None
    return [dict(r) for r in rows] if rows is not None else None
