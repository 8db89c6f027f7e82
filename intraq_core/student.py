"""The quantized student: building it, and saving/loading it as a weights-only checkpoint.

A student checkpoint records the resolved model config and the quantization config next
to the state dict, so it can be rebuilt (``create_model`` → ``quantize`` →
``load_state_dict``) anywhere, and is loadable with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from intraq_core.config import ModelConfig, QuantConfig
from intraq_core.distill import is_step_size, reestimate_bn
from intraq_core.models import create_model
from intraq_core.models.checkpoint import CheckpointError
from intraq_core.quant import act_quantizers, calibrate, quantize, set_act_mode
from intraq_core.quant.reconstruct import reconstruct

STUDENT_FORMAT = "intraq-student/1"


def build_student(teacher: nn.Module, quant_cfg: QuantConfig) -> nn.Module:
    """A trainable fake-quantized copy of the teacher (the teacher itself is untouched).

    Weights and BN affine parameters are trainable; quantizer step sizes only when the config
    learns them in distillation (``learn_weight_scale`` / ``learn_act_scale``).
    """
    student = quantize(teacher, quant_cfg).requires_grad_(True)
    set_step_size_training(student, quant_cfg)
    return student


def set_step_size_training(student: nn.Module, quant_cfg: QuantConfig) -> None:
    """Mark the LSQ step sizes trainable per ``learn_weight_scale`` / ``learn_act_scale``."""
    for name, p in student.named_parameters():
        if is_step_size(name):
            learn = quant_cfg.learn_weight_scale if "weight_quant" in name else quant_cfg.learn_act_scale
            p.requires_grad_(learn)


def prepare_student(
    teacher: nn.Module,
    quant_cfg: QuantConfig,
    calibration: list[torch.Tensor],
    images: torch.Tensor | None = None,
    *,
    reestimate: bool = False,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int, str], None] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Quantize the teacher and set the student up before distillation (``quant.method``).

    Calibrates the activation ranges on ``calibration`` (a list of image batches) and freezes
    them; with ``reestimate`` re-estimates BN statistics on those batches and calibrates again;
    with ``quant.method: reconstruct`` then runs block reconstruction on ``images`` (the
    synthetic training images). Returns the student and a report (reconstruction errors).
    """
    device = torch.device(device)
    student = build_student(teacher, quant_cfg).to(device)
    batches = [b.to(device) for b in calibration]
    calibrate(student, batches)
    if reestimate:
        reestimate_bn(student, iter(batches), device=device)
        for quantizer in act_quantizers(student).values():
            quantizer.reset()
        calibrate(student, batches)
    report: dict[str, Any] = {"method": quant_cfg.method}
    if quant_cfg.method == "reconstruct":
        if images is None:
            raise ValueError("quant.method 'reconstruct' needs the synthetic training images")
        rec = reconstruct(student, images, quant_cfg.reconstruct, seed=seed, device=device, progress=progress)
        report["reconstruct"] = rec.summary()
    set_step_size_training(student, quant_cfg)
    return student, report


def student_checkpoint_bytes(
    student: nn.Module, model_cfg: ModelConfig, quant_cfg: QuantConfig, extra: dict[str, Any] | None = None
) -> bytes:
    """Serialize a student (plain types and tensors only, no pickled objects)."""
    stored = model_cfg.model_dump(mode="json")
    stored["weights"] = None
    payload = {
        "format": STUDENT_FORMAT,
        "model_config": stored,
        "quant_config": quant_cfg.model_dump(mode="json"),
        "state_dict": {k: v.detach().cpu().clone() for k, v in student.state_dict().items()},
        "extra": dict(extra or {}),
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    return buf.getvalue()


def load_student(source: str | Path | bytes) -> tuple[nn.Module, ModelConfig, QuantConfig, dict[str, Any]]:
    """Rebuild a student from checkpoint bytes or a file: (model, model cfg, quant cfg, extra)."""
    raw = source if isinstance(source, bytes) else Path(source).expanduser().read_bytes()
    try:
        payload = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError and others for foreign files
        raise CheckpointError(f"not a loadable student checkpoint (weights_only): {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != STUDENT_FORMAT:
        raise CheckpointError("not an intraq student checkpoint (missing format 'intraq-student/1')")
    model_cfg = ModelConfig.model_validate(payload["model_config"])
    quant_cfg = QuantConfig.model_validate(payload["quant_config"])
    student = quantize(create_model(model_cfg), quant_cfg)
    student.load_state_dict(payload["state_dict"])
    set_act_mode(student, "frozen")
    return student.eval(), model_cfg, quant_cfg, dict(payload.get("extra") or {})
