"""Typed, validated configuration of every stage of the method.

One config class per stage (model, quantization, synthesis, distillation, evaluation).
They are pydantic models so that a run config composed of them round-trips through
YAML/JSON, rejects unknown keys (with a suggestion of the closest valid key) and
validates ranges before any expensive work starts. One module per stage; every name is imported from
here (``from intraq_core.config import QuantConfig``).
"""

from intraq_core.config.distill import DistillConfig
from intraq_core.config.evaluate import EvalConfig
from intraq_core.config.model import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    IMAGENET_CROP_PCT,
    IMAGENET_MEAN,
    IMAGENET_STD,
    INTERPOLATIONS,
    MAX_PLAUSIBLE_MEAN,
    MAX_PLAUSIBLE_STD,
    SMALL_INPUT_MAX,
    ModelConfig,
    default_crop_pct,
    preprocessing_spec,
)
from intraq_core.config.quant import QuantConfig, ReconstructConfig
from intraq_core.config.stage import StageConfig
from intraq_core.config.synth import FLOAT16_MIN_SIZE, SYNTH_PRESETS, SynthConfig

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "FLOAT16_MIN_SIZE",
    "IMAGENET_CROP_PCT",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INTERPOLATIONS",
    "MAX_PLAUSIBLE_MEAN",
    "MAX_PLAUSIBLE_STD",
    "SMALL_INPUT_MAX",
    "SYNTH_PRESETS",
    "DistillConfig",
    "EvalConfig",
    "ModelConfig",
    "QuantConfig",
    "ReconstructConfig",
    "StageConfig",
    "SynthConfig",
    "default_crop_pct",
    "preprocessing_spec",
]
