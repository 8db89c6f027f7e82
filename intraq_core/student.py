"""The quantized student: building it, and saving/loading it as a weights-only checkpoint.

A student checkpoint is the project's one checkpoint format
(:data:`~intraq_core.models.checkpoint.MODEL_CHECKPOINT_FORMAT`) with a ``quant_config``: the
resolved model config and the quantization config next to the state dict, so it can be rebuilt
(``create_model`` → ``quantize`` → ``load_state_dict``) anywhere, and it is loadable with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch.nn as nn

from intraq_core.config import ModelConfig, QuantConfig
from intraq_core.errors import CheckpointError
from intraq_core.models import create_model
from intraq_core.models.checkpoint import checkpoint_bytes, read_model_checkpoint, write_checkpoint
from intraq_core.quant import quantize, set_act_mode, set_step_size_training

__all__ = ["build_student", "load_student", "save_student", "student_checkpoint_bytes"]


def build_student(teacher: nn.Module, quant_cfg: QuantConfig) -> nn.Module:
    """A trainable fake-quantized copy of the teacher (the teacher itself is untouched).

    Weights and BN affine parameters are trainable; quantizer step sizes only when the config
    learns them in distillation (``learn_weight_scale`` / ``learn_act_scale``).
    """
    student = quantize(teacher, quant_cfg).requires_grad_(True)
    set_step_size_training(student, quant_cfg)
    return student


def student_checkpoint_bytes(
    student: nn.Module, model_cfg: ModelConfig, quant_cfg: QuantConfig, extra: dict[str, Any] | None = None
) -> bytes:
    """Serialize a student (plain types and tensors only, no pickled objects).

    ``model_cfg`` should be resolved (see ``resolve_model_config``) so the file is self-describing.
    """
    return checkpoint_bytes(
        student.state_dict(),
        model_cfg.model_dump(mode="json"),
        quant_config=quant_cfg.model_dump(mode="json"),
        extra=extra,
    )


def save_student(
    path: str | os.PathLike[str],
    student: nn.Module,
    model_cfg: ModelConfig,
    quant_cfg: QuantConfig,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a student checkpoint to ``path`` atomically; :func:`load_student` rebuilds it.

    ``model_cfg`` must name an architecture that can be rebuilt (a registered name, ``timm:``,
    or an import path), since the file holds weights, not code.
    """
    return write_checkpoint(
        path,
        student.state_dict(),
        model_cfg.model_dump(mode="json"),
        quant_config=quant_cfg.model_dump(mode="json"),
        extra=extra,
    )


def load_student(source: str | Path | bytes) -> tuple[nn.Module, ModelConfig, QuantConfig, dict[str, Any]]:
    """Rebuild a student from checkpoint bytes or a file: (model, model cfg, quant cfg, extra)."""
    try:
        payload = read_model_checkpoint(source)
    except CheckpointError as exc:
        raise CheckpointError(f"not a loadable intraq student checkpoint: {exc}") from None
    if payload["quant_config"] is None:
        raise CheckpointError("not an intraq student checkpoint: it holds a float model (no quant_config)")
    model_cfg = ModelConfig.model_validate(payload["model_config"])
    saved_quant = dict(payload["quant_config"])
    # Students saved before quant.act_placement existed used the after-activations placement.
    saved_quant.setdefault("act_placement", "after_activations")
    # ... and before quant.depthwise_act_per_channel, per-tensor ranges at depthwise inputs.
    saved_quant.setdefault("depthwise_act_per_channel", False)
    quant_cfg = QuantConfig.model_validate(saved_quant)
    student = quantize(create_model(model_cfg), quant_cfg)
    student.load_state_dict(payload["state_dict"])
    set_act_mode(student, "frozen")
    return student.eval(), model_cfg, quant_cfg, dict(payload["extra"])
