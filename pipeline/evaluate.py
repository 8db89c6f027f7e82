"""Evaluation stage: checkpoints → top-1 on the real test set (final model, never best-epoch)."""

from __future__ import annotations

import torch
import torch.nn as nn

from intraq_core.config import EvalConfig, ModelConfig
from intraq_core.data import load_test_set
from intraq_core.evaluate import top1


def evaluate_model(
    model: nn.Module,
    model_cfg: ModelConfig,
    eval_cfg: EvalConfig,
    *,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> dict[str, float]:
    """Top-1 (%) and sample count of ``model`` on the configured test set."""
    ts = load_test_set(eval_cfg, model_cfg)
    model = model.to(device).eval()
    return top1(
        model, ts.batches(eval_cfg.batch_size), device=device, progress=progress, total=ts.num_samples
    )
