"""Calibration of the student on synthetic images: which images, and the quantization parameters set on them.

Quantize a copy of the teacher, set its quantization parameters on synthetic training images
(``quant.method``: min/max or Lp ranges, block reconstruction, SQuant), optionally re-estimating the
BN statistics first. The images are chosen by position in the training order from the run's seed,
so an executor that reads only those rows (Ray's driver) calibrates on exactly the local executor's
images.
"""

from __future__ import annotations

import torch

from intraq_core.distill import reestimate_bn
from intraq_core.quant import act_quantizers, calibrate_ranges
from intraq_core.quant.methods import CalibrationInputs, run_calibration
from intraq_core.quant.methods import calibration_positions as calibration_positions_of
from intraq_core.seeding import PURPOSE_CALIBRATION, derive_seed
from intraq_core.student import build_student
from pipeline.context import RunContext


def calibration_positions(num_images: int, ctx: RunContext) -> list[torch.Tensor]:
    """Which training images (positions in the training order) each calibration batch uses.

    Split out of :func:`calibration_batches` so an executor that streams the data (Ray) can
    read just these images and still calibrate on exactly the images the local executor uses.
    """
    q, d = ctx.cfg.quant, ctx.cfg.distill
    return calibration_positions_of(num_images, q.calibration_batches, d.batch_size, ctx.cfg.seed)


def calibration_batches(images: torch.Tensor, ctx: RunContext) -> list[torch.Tensor]:
    """Seeded random batches of synthetic images for activation-range calibration."""
    return [images[idx] for idx in calibration_positions(images.shape[0], ctx)]


def reconstruction_positions(num_images: int, ctx: RunContext) -> torch.Tensor | None:
    """Which training images (positions) block reconstruction uses; None without reconstruction."""
    q = ctx.cfg.quant
    if q.method != "reconstruct":
        return None
    n = num_images if q.reconstruct.num_images is None else min(q.reconstruct.num_images, num_images)
    gen = torch.Generator().manual_seed(derive_seed(ctx.cfg.seed, PURPOSE_CALIBRATION, 1))
    return torch.randperm(num_images, generator=gen)[:n]


def prepare_student(ctx: RunContext, teacher: torch.nn.Module, train_images: torch.Tensor) -> torch.nn.Module:
    """Quantize, calibrate ranges (then freeze), optionally re-estimate BN (then re-calibrate)
    and, with ``quant.method: reconstruct``, run block reconstruction on the training images."""
    positions = reconstruction_positions(train_images.shape[0], ctx)
    images = train_images[positions] if positions is not None else None
    return calibrate_student(ctx, teacher, calibration_batches(train_images, ctx), images)


def calibrate_student(
    ctx: RunContext,
    teacher: torch.nn.Module,
    batches: list[torch.Tensor],
    images: torch.Tensor | None = None,
    device: torch.device | None = None,
) -> torch.nn.Module:
    """:func:`prepare_student` on given calibration batches and reconstruction images
    (executors that read only those rows), on ``device`` (default: the run's).

    With ``distill.bn: reestimate`` the BN statistics are re-estimated on the batches first (the
    ranges calibrated before and after); then the quantization parameters are set by
    ``quant.method`` (:func:`intraq_core.quant.methods.run_calibration`). ``squant`` needs no batches: it
    rounds the weights and sets the activation ranges from the BN statistics.
    """
    device = ctx.device if device is None else device
    teacher = teacher.to(device)
    student = build_student(teacher, ctx.cfg.quant).to(device)
    batches = [b.to(device) for b in batches]
    if ctx.cfg.distill.bn == "reestimate" and batches:
        calibrate_ranges(student, batches)
        reestimate_bn(student, iter(batches), device=device)
        for quantizer in act_quantizers(student).values():
            quantizer.reset()
    inputs = CalibrationInputs(
        batches, teacher, images, ctx.cfg.seed, image_shape=ctx.image_shape, normalization=ctx.normalization
    )
    run_calibration(student, ctx.cfg.quant, inputs)
    return student
