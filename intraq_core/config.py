"""Typed, validated configuration of every stage of the method.

One config class per stage (model, quantization, synthesis, distillation, evaluation).
They are pydantic models so that a run config composed of them round-trips through
YAML/JSON, rejects unknown keys (with a suggestion of the closest valid key) and
validates ranges before any expensive work starts.
"""

from __future__ import annotations

import difflib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class StageConfig(BaseModel):
    """Base of every config: unknown keys are errors that name the closest valid key."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            known = set(cls.model_fields)
            for key in data:
                if key not in known:
                    close = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.5)
                    hint = f"; did you mean '{close[0]}'?" if close else ""
                    valid = ", ".join(sorted(known))
                    raise ValueError(f"unknown key '{key}' in {cls.__name__}{hint} (valid keys: {valid})")
        return data


class ModelConfig(StageConfig):
    """Which classifier to build and how its inputs are normalized.

    ``arch`` is a registry name (``cifar_resnet20``, ``torchvision:resnet18``) or the path
    of a checkpoint written by this project (which records its own architecture).
    ``weights`` is a checkpoint path, a named asset (``cifar10-resnet20``) or None
    (random initialization; only useful for tests). ``mean``/``std`` left as None are
    taken from the weights asset, then the checkpoint, then the architecture's default.
    """

    arch: str = "cifar_resnet20"
    weights: str | None = None
    num_classes: int | None = Field(default=None, ge=2)
    shortcut: Literal["A", "B"] | None = None
    image_size: int | None = Field(default=None, ge=8)
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    @model_validator(mode="after")
    def _check_std(self) -> ModelConfig:
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ValueError("model.std must be positive")
        return self


class QuantConfig(StageConfig):
    """Uniform asymmetric fake quantization (weights per output channel, activations per tensor).

    Placement follows the reference: every Conv/Linear weight, and the output of every
    ReLU/ReLU6. Optional extras: separate bits for the first/last layer, quantizing the
    network input and the residual additions.
    """

    w_bits: int = Field(default=4, ge=2, le=8)
    a_bits: int = Field(default=4, ge=2, le=8)
    first_layer_bits: int | None = Field(default=None, ge=2, le=8)
    last_layer_bits: int | None = Field(default=None, ge=2, le=8)
    quantize_input: bool = False
    input_bits: int = Field(default=8, ge=2, le=8)
    quantize_residual: bool = False
    weight_symmetric: bool = False
    ema_decay: float = Field(default=0.9, gt=0.0, lt=1.0)
    calibration_batches: int = Field(default=8, ge=1)

    @property
    def tag(self) -> str:
        return f"W{self.w_bits}A{self.a_bits}"


class SynthConfig(StageConfig):
    """Synthesis of images by optimizing pixels against the frozen teacher.

    ``method`` picks a preset of loss weights; any weight given explicitly overrides the
    preset. Presets: ``intraq`` (BNS + SIL + MDC + LOR), ``bns_ce`` (BNS + hard-label CE,
    the ZeroQ/GDFQ-style baseline), ``adi`` (IntraQ with MDC replaced by DeepInversion's
    teacher–student competition term), ``gaussian`` (N(0,1) noise, no optimization) and
    ``custom`` (all weights as given, zero when absent).
    """

    method: Literal["intraq", "bns_ce", "adi", "gaussian", "custom"] = "intraq"
    num_images: int = Field(default=5120, ge=1)
    batch_size: int = Field(default=256, ge=2)
    iterations: int = Field(default=1000, ge=1)
    lr: float = Field(default=0.5, gt=0.0)
    plateau_patience: int = Field(default=50, ge=1)
    plateau_factor: float = Field(default=0.1, gt=0.0, lt=1.0)
    min_lr: float = Field(default=1e-4, ge=0.0)
    label_plan: Literal["balanced", "uniform"] = "balanced"
    # Loss weights (None = take the preset's value).
    bns_weight: float | None = Field(default=None, ge=0.0)
    ce_weight: float | None = Field(default=None, ge=0.0)
    sil_weight: float | None = Field(default=None, ge=0.0)
    mdc_weight: float | None = Field(default=None, ge=0.0)
    adi_weight: float | None = Field(default=None, ge=0.0)
    lor: bool | None = None
    # Soft Inception Loss.
    sil_epsilon: float = Field(default=0.95, ge=0.0, le=1.0)
    sil_fraction: float = Field(default=0.5, ge=0.0, le=1.0)
    # Marginal Distance Constraint.
    mdc_lower: float = Field(default=0.05, ge=0.0, le=2.0)
    mdc_upper: float = Field(default=0.8, ge=0.0, le=2.0)
    mdc_feature: str = "penultimate"
    # Local Object Reinforcement.
    lor_prob: float = Field(default=0.5, ge=0.0, le=1.0)
    lor_min_area: float = Field(default=0.5, gt=0.0, le=1.0)
    lor_flip: bool = True
    lor_rotation: float = Field(default=0.0, ge=0.0, le=180.0)
    # Keep pixels inside the valid image range ([0, 1] before normalization) by projecting
    # after every Adam step, as DeepInversion does. The IntraQ reference never clips; its
    # unbounded pixels (up to ~±10 in normalized units) inflate the activation ranges that
    # the quantized student is calibrated with.
    clip_pixels: bool = False
    # ADI: bits of the quantized copy of the teacher that plays the student.
    adi_bits: int = Field(default=4, ge=2, le=8)
    # Engineering knobs (do not change the method).
    shards_per_round: int = Field(default=4, ge=1)
    channels_last: bool = True
    compile: bool = False
    amp: Literal["off", "bf16"] = "off"

    @model_validator(mode="after")
    def _check(self) -> SynthConfig:
        if self.mdc_lower > self.mdc_upper:
            raise ValueError("synth.mdc_lower must be <= synth.mdc_upper")
        return self

    def weights(self) -> dict[str, float]:
        """Effective loss weights after applying the preset of ``method``."""
        preset = SYNTH_PRESETS[self.method]
        out = {}
        for name in ("bns", "ce", "sil", "mdc", "adi"):
            given = getattr(self, f"{name}_weight")
            out[name] = float(given if given is not None else preset.get(name, 0.0))
        return out

    def lor_enabled(self) -> bool:
        """Whether LOR is on after applying the preset of ``method``."""
        if self.lor is not None:
            return self.lor
        return bool(SYNTH_PRESETS[self.method].get("lor", False))

    @property
    def optimizes(self) -> bool:
        return self.method != "gaussian"


SYNTH_PRESETS: dict[str, dict[str, float]] = {
    "intraq": {"bns": 1.0, "sil": 1.0, "mdc": 1.0, "lor": 1.0},
    "bns_ce": {"bns": 1.0, "ce": 1.0},
    "adi": {"bns": 1.0, "sil": 1.0, "adi": 1.0, "lor": 1.0},
    "gaussian": {},
    "custom": {},
}


class DistillConfig(StageConfig):
    """Quantization-aware distillation of the student from the frozen teacher.

    Loss = kd_alpha * T^2 * KL(teacher/T || student/T) + ce_weight * CE(student, label).
    The reference uses kd_alpha = T = 20 and lr 1e-4, which diverges on the shared
    CIFAR-10 teacher; the defaults here are the stable recipe (alpha 1, T 4, lr 1e-3,
    cosine decay) chosen by the data-free agreement check.
    """

    epochs: int = Field(default=50, ge=1)
    iterations_per_epoch: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=128, ge=1)
    lr: float = Field(default=1e-3, gt=0.0)
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    nesterov: bool = True
    weight_decay: float = Field(default=1e-4, ge=0.0)
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    milestones: list[int] = Field(default_factory=lambda: [20, 40, 60])
    gamma: float = Field(default=0.1, gt=0.0, le=1.0)
    kd_alpha: float = Field(default=1.0, ge=0.0)
    kd_temperature: float = Field(default=4.0, gt=0.0)
    ce_weight: float = Field(default=1.0, ge=0.0)
    crop_scale: tuple[float, float] = (0.5, 1.0)
    flip: bool = True
    bn: Literal["frozen", "reestimate"] = "frozen"
    holdout_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    grad_clip: float | None = Field(default=None, gt=0.0)
    # Cadence, in epochs (None: a tenth of the run); both also fall on the last epoch.
    # checkpoint_every: resume points (train_state.pt locally, Ray Train checkpoints on Ray).
    # eval_every: teacher agreement on the held-out synthetic split, recorded in the history.
    checkpoint_every: int | None = Field(default=None, ge=1)
    eval_every: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _check(self) -> DistillConfig:
        lo, hi = self.crop_scale
        if not (0.0 < lo <= hi <= 1.0):
            raise ValueError("distill.crop_scale must satisfy 0 < low <= high <= 1")
        return self


class EvalConfig(StageConfig):
    """Real labelled test set used for the final accuracy (never for model selection).

    ``data`` is a named asset (``cifar10-test``), a ``.npz`` file (``images`` uint8 NHWC,
    ``labels``), ``torchvision:cifar10`` / ``torchvision:cifar100`` (downloaded into
    ``root`` when missing) or an ImageFolder directory (ImageNet-style val).
    """

    data: str = "cifar10-test"
    root: str | None = None
    batch_size: int = Field(default=500, ge=1)
    resize: int | None = Field(default=None, ge=1)
    crop: int | None = Field(default=None, ge=1)
    limit: int | None = Field(default=None, ge=1)
    num_workers: int = Field(default=0, ge=0)
