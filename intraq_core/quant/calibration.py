"""Activation ranges of a fake-quant student: the quantizers' mode (:func:`set_act_mode`) and calibration on
batches of images (:func:`calibrate_ranges`); which LSQ step sizes train (:func:`set_step_size_training`).
``intraq_core.calibrate`` runs a whole ``QuantConfig.method``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from intraq_core.config import QuantConfig
from intraq_core.quant.act_quantizer import ACT_MODES
from intraq_core.quant.layers import act_quantizers

__all__ = ["calibrate_ranges", "is_step_size", "set_act_mode", "set_step_size_training"]


def set_act_mode(model: nn.Module, mode: str) -> None:
    """Put every activation quantizer of ``model`` in ``mode`` (see :class:`ActFakeQuant`).

    Freezing checks all quantizers first and names the uncalibrated ones in the error.
    """
    if mode not in ACT_MODES:
        raise ValueError(f"unknown activation quantizer mode {mode!r}; expected one of {ACT_MODES}")
    quants = act_quantizers(model)
    if mode == "frozen":
        missing = [name for name, q in quants.items() if not q.calibrated]
        if missing:
            raise RuntimeError(
                f"cannot freeze: {len(missing)} activation quantizer(s) were never calibrated "
                f"(not reached by any calibration batch?): {', '.join(missing)}"
            )
    for q in quants.values():
        q.mode = mode


def _model_device(model: nn.Module) -> torch.device | None:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return None


def calibrate_ranges(model: nn.Module, batches: Iterable[Any], *, freeze: bool = True) -> int:
    """Calibrate the activation ranges on ``batches``; return the number of batches used.

    Sets every activation quantizer to ``"calibrate"``, runs the model in eval mode under
    ``no_grad`` on each batch (a tensor, or a tuple/list whose first item is the input; moved
    to the model's device), restores the train/eval mode, then freezes the ranges if
    ``freeze``. Calibration continues the existing EMAs (see ``ActFakeQuant.reset``).
    """
    set_act_mode(model, "calibrate")
    device = _model_device(model)
    training = model.training
    model.eval()
    count = 0
    try:
        with torch.no_grad():
            for batch in batches:
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                if device is not None:
                    x = x.to(device, non_blocking=True)
                model(x)
                count += 1
    finally:
        model.train(training)
    if freeze:
        set_act_mode(model, "frozen")
    return count


def is_step_size(name: str) -> bool:
    """Whether a parameter name is a quantizer step size (LSQ), which gets no weight decay."""
    return name.endswith(".scale") and ("weight_quant" in name or "act_quant" in name)


def set_step_size_training(student: nn.Module, quant_cfg: QuantConfig) -> None:
    """Mark the LSQ step sizes trainable per ``learn_weight_scale`` / ``learn_act_scale``."""
    for name, p in student.named_parameters():
        if is_step_size(name):
            learn = quant_cfg.learn_weight_scale if "weight_quant" in name else quant_cfg.learn_act_scale
            p.requires_grad_(learn)
