"""Evaluation stage: checkpoints → top-1 on the real test set (final model, never best-epoch)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from intraq_core.config import EvalConfig, ModelConfig
from intraq_core.data import TestSet, load_test_set
from intraq_core.evaluate import top1
from intraq_core.quant import quant_map
from intraq_core.student import load_student
from pipeline.context import RunContext
from pipeline.stages.train import CALIBRATED_PATH, STUDENT_PATH

#: The model.* keys a user may set to evaluate a saved student differently from what it records.
_INPUT_KEYS = ("mean", "std", "resize", "crop_pct", "interpolation")


def evaluate_model(
    model: nn.Module,
    model_cfg: ModelConfig,
    eval_cfg: EvalConfig,
    *,
    device: torch.device | str = "cpu",
    progress: bool = False,
    test_set: TestSet | None = None,
) -> dict[str, float]:
    """Top-1 (%) and sample count of ``model`` on the configured test set (``test_set``: already loaded)."""
    ts = test_set if test_set is not None else load_test_set(eval_cfg, model_cfg)
    model = model.to(device).eval()
    return top1(model, ts.batches(eval_cfg.batch_size), device=device, progress=progress, total=ts.num_samples)


def evaluate_run(ctx: RunContext, *, progress: bool) -> dict[str, Any]:
    """A run's evaluation: the FP teacher, the calibrated student (PTQ on synthetic data) and the final
    student on the real test set, loaded once for the three."""
    device, model_cfg, eval_cfg = ctx.driver_device, ctx.model_cfg, ctx.cfg.eval
    test_set = load_test_set(eval_cfg, model_cfg)

    def evaluate(model: nn.Module) -> dict[str, float]:
        return evaluate_model(model, model_cfg, eval_cfg, device=device, progress=progress, test_set=test_set)

    fp = evaluate(ctx.teacher())
    calibrated, _, _, _ = load_student(ctx.storage.read_bytes(CALIBRATED_PATH))
    ptq = evaluate(calibrated)
    final, _, _, _ = load_student(ctx.storage.read_bytes(STUDENT_PATH))
    same = all(
        torch.equal(a, b) for a, b in zip(final.state_dict().values(), calibrated.state_dict().values(), strict=True)
    )
    # Without distillation, or when the guard kept the start, the final student is the calibrated one.
    quant = ptq if same else evaluate(final)
    return {
        "fp_top1": fp["top1"],
        "ptq_top1": ptq["top1"],
        "quant_top1": quant["top1"],
        "test_images": quant["n"],
        "test_set": eval_cfg.data,
        "quantization": {"protocol": ctx.cfg.quant.protocol, **quant_map(final)},
    }


def evaluate_command(
    *,
    model_cfg: ModelConfig,
    eval_cfg: EvalConfig,
    bits: tuple[int, int] | None = None,
    calib: str | None = None,
    calib_images: int = 512,
    progress: bool = True,
) -> dict[str, float]:
    """``intraq-pipeline evaluate``: a float model, a PTQ model, or a saved student.

    ``model_cfg.weights`` may be a student checkpoint written by a run (evaluated as saved). With
    ``bits`` a float model is quantized and its activation ranges calibrated (min/max EMA) on
    the first ``calib_images`` images of ``calib`` — a naive PTQ baseline.
    """
    from intraq_core.config import QuantConfig
    from intraq_core.models import create_model, resolve_model_config
    from intraq_core.models.checkpoint import CheckpointError
    from intraq_core.preflight import check_model
    from intraq_core.quant import calibrate_ranges
    from intraq_core.student import build_student

    student = None
    if model_cfg.weights is not None and bits is None:
        try:
            student, saved_cfg, _, _ = load_student(model_cfg.weights)
        except (CheckpointError, FileNotFoundError, IsADirectoryError):
            student = None
    if student is None:
        if bits is not None and calib is None:
            raise ValueError("--bits needs --calib DATA: the images that calibrate the activation ranges")
        model_cfg = resolve_model_config(model_cfg)
        model = create_model(model_cfg)
        quant_cfg = QuantConfig(w_bits=bits[0], a_bits=bits[1]) if bits is not None else None
        check_model(model, model_cfg, quant_cfg)  # one line, not a traceback, for a model the method cannot use
        if quant_cfg is not None:
            model = build_student(model, quant_cfg).eval()
            calib_cfg = EvalConfig(
                data=calib, limit=calib_images, classes=eval_cfg.classes, num_workers=eval_cfg.num_workers
            )
            calib_set = load_test_set(calib_cfg, model_cfg)
            calibrate_ranges(model, (x for x, _ in calib_set.batches(min(eval_cfg.batch_size, calib_images))))
    else:
        model = student
        # The student records its normalization and preprocessing; explicit model.* values still win.
        explicit = {k: v for k, v in model_cfg.model_dump(exclude_unset=True).items() if k in _INPUT_KEYS}
        if "resize" in explicit or "crop_pct" in explicit:  # one of the two replaces the recorded one
            explicit = {"resize": None, "crop_pct": None, **explicit}
        model_cfg = ModelConfig.model_validate({**saved_cfg.model_dump(), **explicit})
    result = evaluate_model(model, model_cfg, eval_cfg, progress=progress)
    if student is not None or bits is not None:
        result["quantization"] = quant_map(model)  # type: ignore[assignment]
    return result
