"""The calibration step of each ``QuantConfig.method``, and which images the calibration batches hold.

``minmax`` calibrates the activation ranges on the batches; ``reconstruct`` then fits each block to the
teacher (:mod:`intraq_core.quant.reconstruct`); ``squant`` flips the weights' rounding and takes ranges
from the BN statistics (:mod:`intraq_core.quant.squant`). :func:`run_calibration` is the one place the
Python API's ``calibrate`` and the pipeline's training stage go through.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from intraq_core.config import QuantConfig
from intraq_core.quant.calibration import calibrate_ranges, set_step_size_training
from intraq_core.quant.sensitivity import (
    SENSITIVITY_IMAGES,
    SENSITIVITY_KEY,
    activation_sensitivity,
    format_sensitivity,
)
from intraq_core.seeding import PURPOSE_CALIBRATION, derive_seed

__all__ = ["CALIBRATION_METHODS", "CalibrationInputs", "calibration_positions", "run_calibration"]

log = logging.getLogger(__name__)


def calibration_positions(num_images: int, num_batches: int, batch_size: int, seed: int) -> list[Tensor]:
    """Which images each calibration batch uses: seeded, without repeats until all are used.

    The pipeline calibrates on exactly these images too (executors that stream the data read
    only them).
    """
    gen = torch.Generator().manual_seed(derive_seed(seed, PURPOSE_CALIBRATION))
    order = torch.randperm(num_images, generator=gen)
    size = min(batch_size, num_images)
    out = []
    for b in range(num_batches):
        idx = order[(b * size) % num_images :][:size]
        if idx.numel() < size:
            idx = torch.cat([idx, order[: size - idx.numel()]])
        out.append(idx)
    return out


@dataclass
class CalibrationInputs:
    """What a calibration step may use: the range-calibration batches, the teacher, the synthetic
    training images (block reconstruction fits units on them), a seed and a progress callback."""

    batches: list[Tensor]
    teacher: nn.Module | None = None
    images: Tensor | None = None
    seed: int = 0
    progress: Callable[[int, int, str], None] | None = None
    image_shape: tuple[int, int, int] | None = None
    normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None


def _rank_tensors(student: nn.Module, inputs: CalibrationInputs) -> dict[str, Any]:
    """``{"sensitivity": rows}``: what each activation tensor costs alone at the ranges just set
    (:mod:`intraq_core.quant.sensitivity`; before any learned step size, so each row is the
    tensor's own cost), on the first calibration batch; logged and recorded on the student for the
    run's metrics. ``{}`` without the teacher or images."""
    if inputs.teacher is None or not inputs.batches:
        return {}
    images = inputs.batches[0][:SENSITIVITY_IMAGES]
    rows = activation_sensitivity(inputs.teacher, student, images)
    meta = getattr(student, "meta", None)
    if isinstance(meta, dict):
        meta[SENSITIVITY_KEY] = rows
    if rows:
        log.info(
            "activation tensors alone (weights float, %d calibration images), most costly: %s",
            images.shape[0],
            format_sensitivity(rows),
        )
    return {"sensitivity": rows}


def _minmax(student: nn.Module, config: QuantConfig, inputs: CalibrationInputs) -> dict[str, Any]:
    """Each activation's range from the batches (EMA of min/max, or the Lp search when
    ``act_range: lp``), then frozen (:func:`intraq_core.quant.calibrate_ranges`)."""
    calibrate_ranges(student, inputs.batches)
    return _rank_tensors(student, inputs)


def _reconstruct(student: nn.Module, config: QuantConfig, inputs: CalibrationInputs) -> dict[str, Any]:
    """Ranges as ``minmax``, then block reconstruction on the synthetic images
    (:func:`intraq_core.quant.reconstruct.reconstruct`; the batches when no images are given)."""
    from intraq_core.quant.reconstruct import reconstruct

    calibrate_ranges(student, inputs.batches)
    ranked = _rank_tensors(student, inputs)  # before reconstruction co-adapts the step sizes
    images = inputs.images if inputs.images is not None else torch.cat(inputs.batches)
    device = next(student.parameters()).device
    report = reconstruct(student, images, config.reconstruct, seed=inputs.seed, device=device, progress=inputs.progress)
    return {**ranked, "reconstruct": report.summary()}


def _squant(student: nn.Module, config: QuantConfig, inputs: CalibrationInputs) -> dict[str, Any]:
    """SQuant: flip the weights' rounding (kernel- and channel-wise summed error) and set the
    activation ranges from the BN statistics; no image is used (:func:`intraq_core.quant.squant_`)."""
    from intraq_core.quant import squant_

    shape = inputs.image_shape
    if shape is None:
        shape = tuple(inputs.batches[0].shape[1:]) if inputs.batches else (3, 32, 32)  # type: ignore[assignment]
    report = squant_(
        student,
        config,
        image_shape=shape,
        normalization=inputs.normalization,
        seed=derive_seed(inputs.seed, PURPOSE_CALIBRATION),
    )
    summary = report.summary()
    log.info(
        "SQuant: %d of %d weights flipped from nearest rounding (max |kernel error| %.3f, max |channel error| %.3f "
        "steps), %d activation ranges from BN statistics, %.2f s",
        summary["flipped"],
        summary["weights"],
        summary["max_kernel_error"],
        summary["max_channel_error"],
        summary["activation_quantizers"],
        summary["seconds"],
    )
    return {**_rank_tensors(student, inputs), "squant": summary}


#: ``QuantConfig.method`` → the step that sets the student's quantization parameters:
#: ``step(student, config, inputs) -> report`` (a dict for the run's metrics).
CALIBRATION_METHODS: dict[str, Callable[[nn.Module, QuantConfig, CalibrationInputs], dict[str, Any]]] = {
    "minmax": _minmax,
    "reconstruct": _reconstruct,
    "squant": _squant,
}


def run_calibration(student: nn.Module, config: QuantConfig, inputs: CalibrationInputs) -> dict[str, Any]:
    """Run the calibration step of ``config.method`` on ``inputs``; returns its report.

    The one place both :func:`calibrate` and the pipeline's training stage go through. Afterwards
    the LSQ step sizes are trainable exactly when the config learns them in distillation. With the
    teacher given, what each activation tensor costs alone at the ranges the step sets (before
    block reconstruction learns anything) is measured on the first calibration batch, logged and
    returned as ``sensitivity`` (most costly first; recorded on the student too:
    :func:`intraq_core.quant.sensitivity.recorded_sensitivity`).
    """
    step = CALIBRATION_METHODS.get(config.method)
    if step is None:
        raise ValueError(f"unknown quant.method {config.method!r}; choose one of {', '.join(CALIBRATION_METHODS)}")
    report = step(student, config, inputs)
    set_step_size_training(student, config)
    return report
