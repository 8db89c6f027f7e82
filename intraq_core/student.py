"""The quantized student: building it, and saving/loading it as a weights-only checkpoint.

A student checkpoint records the resolved model config and the quantization config next
to the state dict, so it can be rebuilt (``create_model`` → ``quantize`` →
``load_state_dict``) anywhere, and is loadable with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from intraq_core.config import ModelConfig, QuantConfig
from intraq_core.models import create_model
from intraq_core.models.checkpoint import CheckpointError
from intraq_core.quant import quantize, set_act_mode

STUDENT_FORMAT = "intraq-student/1"


def build_student(teacher: nn.Module, quant_cfg: QuantConfig) -> nn.Module:
    """A trainable fake-quantized copy of the teacher (the teacher itself is untouched)."""
    return quantize(teacher, quant_cfg).requires_grad_(True)


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
