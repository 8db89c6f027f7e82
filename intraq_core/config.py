"""Typed, validated configuration of every stage of the method.

One config class per stage (model, quantization, synthesis, distillation, evaluation).
They are pydantic models so that a run config composed of them round-trips through
YAML/JSON, rejects unknown keys (with a suggestion of the closest valid key) and
validates ranges before any expensive work starts.
"""

from __future__ import annotations

import difflib
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
#: The ImageNet evaluation convention: resize the shorter side to image_size / 0.875 (256 for 224),
#: then centre-crop image_size.
IMAGENET_CROP_PCT = 0.875
#: Inputs of at most this many pixels (CIFAR's 32, Tiny ImageNet's 64) are used at their size: no
#: resize unless the model spec asks for one.
SMALL_INPUT_MAX = 64
#: The largest plausible mean / std of pixels on the [0, 1] scale (any mean of [0, 1] data is at most
#: 1 and any std at most 0.5; "std 1" is the identity normalization). Values on the 0-255 scale
#: (ImageNet's 123.7 / 58.4) are far beyond, which is the mistake these catch.
MAX_PLAUSIBLE_MEAN = 1.5
MAX_PLAUSIBLE_STD = 2.0
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


def preprocessing_spec(crop_pct: Any, interpolation: Any) -> dict[str, Any]:
    """``crop_pct`` / ``interpolation`` of a timm-style ``pretrained_cfg``, keeping only values this
    project reproduces (a ratio in (0, 1]; bilinear, bicubic or nearest)."""
    out: dict[str, Any] = {}
    if isinstance(crop_pct, (int, float)) and 0.0 < float(crop_pct) <= 1.0:
        out["crop_pct"] = float(crop_pct)
    if interpolation in INTERPOLATIONS:
        out["interpolation"] = interpolation
    return out


def default_crop_pct(image_size: int | None) -> float | None:
    """The crop ratio of a model spec that names none: ImageNet's 0.875 above 64 pixels, else no resize."""
    if image_size is None or image_size <= SMALL_INPUT_MAX:
        return None
    return IMAGENET_CROP_PCT


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
    """Which classifier to build and how its inputs are normalized: the model spec.

    ``arch`` is a registry name (``cifar_resnet20``, ``torchvision:resnet18``), ``timm:<name>``
    (optional extra), an import path ``package.module:callable`` returning an ``nn.Module``
    (called with ``kwargs``), or the path of a checkpoint written by this project (which
    records its own architecture). ``weights`` is a state_dict file (plain, or under
    ``state_dict``/``model``; always loaded weights-only), a named asset (``cifar10-resnet20``),
    ``torchvision:<TAG>`` / ``timm:<TAG>`` published weights, or None (random initialization,
    seeded so that every process builds the same network; only useful for tests).
    ``mean``/``std`` are the input normalization the weights were trained with (RGB in
    [0, 1], then ``(x - mean) / std``): left as None they are taken from
    the weights' metadata, then the checkpoint, then the architecture's default, so set them
    for a checkpoint of your own; values beyond the [0, 1] scale (mean > 1.5, std > 2: the 0-255
    statistics) are refused. ``shortcut`` (CIFAR ResNets) left as None is read off the
    checkpoint's keys. ``output`` is for a model whose forward returns several things (a
    tuple/list, e.g. ``(logits, features)``, or a dict): the index (tuple/list) or key (dict) of
    its logits; the model is then wrapped so that everything downstream sees the logits only.

    Preprocessing of real images (test sets; ``intraq_core.data``): the shorter side is resized
    to ``resize`` pixels (or ``floor(image_size / crop_pct)``, timm's convention; give one of the
    two) with ``interpolation``, then the centre ``image_size`` × ``image_size`` is cropped. Left
    unset they come from the weights' metadata (torchvision's resize size, timm's ``crop_pct``
    and ``interpolation``), a ``pretrained_cfg`` on an imported callable, the checkpoint, else
    ImageNet's convention for inputs above 64 pixels (crop_pct 0.875: 256 -> 224, bilinear) and
    no resize at all for small inputs (CIFAR's 32: images must already be that size).
    """

    arch: str = "cifar_resnet20"
    weights: str | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)
    num_classes: int | None = Field(default=None, ge=2)
    shortcut: Literal["A", "B"] | None = None
    image_size: int | None = Field(default=None, ge=8)
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    output: int | str | None = None
    resize: int | None = Field(default=None, ge=1)
    crop_pct: float | None = Field(default=None, gt=0.0, le=1.0)
    interpolation: Literal["bilinear", "bicubic", "nearest"] | None = None

    @field_validator("mean", "std", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        # "--set model.mean=0.49,0.48,0.45" arrives as a string.
        if isinstance(value, str):
            return tuple(part.strip() for part in value.strip("()[] ").split(","))
        return value

    @model_validator(mode="after")
    def _check_std(self) -> ModelConfig:
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ValueError("model.std must be positive")
        for key, bound in (("mean", MAX_PLAUSIBLE_MEAN), ("std", MAX_PLAUSIBLE_STD)):
            value = getattr(self, key)
            if value is not None and any(v > bound for v in value):
                scaled = ",".join(f"{v / 255:.4g}" for v in value)
                raise ValueError(
                    f"model.{key}={list(value)} is beyond the [0, 1] scale of the inputs (RGB in [0, 1]); statistics "
                    f"on the 0-255 scale must be divided by 255 (model.{key}={scaled})"
                )
        if self.resize is not None and self.crop_pct is not None:
            raise ValueError("give model.resize or model.crop_pct, not both (resize = floor(image_size / crop_pct))")
        if self.resize is not None and self.image_size is not None and self.resize < self.image_size:
            raise ValueError(
                f"model.resize={self.resize} is smaller than model.image_size={self.image_size}: the shorter side is "
                "resized to model.resize before the centre crop of image_size"
            )
        return self

    @property
    def resize_size(self) -> int | None:
        """The shorter side (pixels) real images are resized to before the centre crop; None: no resize."""
        if self.resize is not None:
            return self.resize
        crop_pct = self.crop_pct if self.crop_pct is not None else default_crop_pct(self.image_size)
        if crop_pct is None or self.image_size is None:
            return None
        # timm's rule (floor); the epsilon keeps a ratio like 224/232 from landing on 231.
        return math.floor(self.image_size / crop_pct + 1e-6)

    @property
    def resize_interpolation(self) -> str:
        """The interpolation of the resize (bilinear unless the spec says otherwise)."""
        return self.interpolation or "bilinear"


class ReconstructConfig(StageConfig):
    """Block-reconstruction PTQ (``quant.method: reconstruct``): AdaRound + LSQ + QDrop, unit by unit.

    Each unit (the stem, every residual block, the head) learns the soft rounding of its
    weights (AdaRound's rectified sigmoid, regularizer ``reg_weight · Σ 1-|2h-1|^β`` with β
    annealed from ``beta_start`` to ``beta_end`` after ``warmup`` of the iterations) and, with
    ``learn_act_scale``, its activation step sizes, minimizing the MSE between its output and
    the full-precision teacher's on the same synthetic images. ``drop_prob`` is QDrop's
    probability of keeping an activation element unquantized during this optimization
    (0 disables QDrop, BRECQ-style). ``num_images`` synthetic training images are used
    (all when None). ``bias_lr`` > 0 also trains the unit's biases (its BatchNorm shifts and
    conv/linear biases) with that learning rate: the mean shift that rounding and clipping leave in
    each channel is absorbed where an integer kernel keeps it anyway (bias correction, learned);
    0 leaves every float parameter untouched.
    """

    iterations: int = Field(default=1000, ge=1)
    batch_size: int = Field(default=64, ge=1)
    num_images: int | None = Field(default=1024, ge=1)
    lr: float = Field(default=3e-3, gt=0.0)
    act_lr: float = Field(default=4e-5, ge=0.0)
    learn_act_scale: bool = True
    reg_weight: float = Field(default=0.01, ge=0.0)
    beta_start: float = Field(default=20.0, gt=0.0)
    beta_end: float = Field(default=2.0, gt=0.0)
    warmup: float = Field(default=0.2, ge=0.0, lt=1.0)
    drop_prob: float = Field(default=0.5, ge=0.0, le=1.0)
    bias_lr: float = Field(default=0.0, ge=0.0)


class QuantConfig(StageConfig):
    """Uniform asymmetric fake quantization (weights per output channel, activations per tensor).

    Placement: every Conv1d/Conv2d/Linear weight (subclasses included when their forward is the
    standard one) and, with ``act_placement="weight_inputs"`` (the default; BRECQ/QDrop/Genie),
    the input tensor of every weight layer whatever produced it (any activation function, a
    pooling of one, a residual add, a BN or conv output with no activation), one quantizer per
    tensor, placed where the tensor is produced so that every reader sees the quantized value;
    the first layer's input (the image) only with ``quantize_input``. Pooling, flattening,
    reshaping, dropout and zero padding pass a quantized tensor through (an integer target
    pools on the input's grid). ``act_placement="after_activations"`` is the ZeroQ/IntraQ
    reference placement: a quantizer after every activation-function call and nothing else; on
    ResNets both placements put the same quantizers in the same places. The grid is unsigned
    only where the producer is provably non-negative (ReLU, ReLU6, sigmoid, ...), signed
    otherwise. ``depthwise_act_per_channel`` (default on) gives a tensor that only depthwise
    convolutions read one range per channel: each depthwise output reads a single input
    channel, so the per-channel step and zero point fold into that channel's weight scale and
    bias and the integer kernel stays integer (MobileNets' first depthwise input mixes channels
    whose ranges differ 100-fold: one per-tensor 8-bit grid there costs ~5 points of ImageNet
    top-1 on the shared MobileNetV1). Networks without depthwise convolutions (ResNets) are
    unaffected. Optional extras: separate bits for the first/last layer
    (the 8-bit first/last protocol of Genie/QDrop), for the activations that feed the last
    layer (``last_input_bits``; SQuant's protocol uses 8), quantizing the network input and the
    residual additions.

    ``method`` says how the quantized model is set up before any distillation: ``minmax``
    (the reference: ``calibration_batches`` synthetic batches, the EMA of each activation's
    min/max, nearest rounding), ``reconstruct`` (block-reconstruction PTQ on the synthetic
    images, see :class:`ReconstructConfig`) or ``squant`` (SQuant, ICLR 2022: rounding
    directions flipped to minimize the kernel- and channel-wise summed error, activation ranges
    from the BN statistics, no image at all; ``intraq_core.quant.squant``, ``squant_*`` keys);
    see ``intraq_core.api.CALIBRATION_METHODS``. ``weight_range``/``act_range`` choose the range
    rule (``minmax``, or ``lp``: the range minimizing the Lp error, ``lp_norm`` = p), and
    ``learn_weight_scale``/``learn_act_scale`` make the step sizes trainable (LSQ) during
    distillation and reconstruction.
    """

    method: Literal["minmax", "reconstruct", "squant"] = "minmax"
    act_placement: Literal["weight_inputs", "after_activations"] = "weight_inputs"
    depthwise_act_per_channel: bool = True
    w_bits: int = Field(default=4, ge=2, le=8)
    a_bits: int = Field(default=4, ge=2, le=8)
    first_layer_bits: int | None = Field(default=None, ge=2, le=8)
    last_layer_bits: int | None = Field(default=None, ge=2, le=8)
    last_input_bits: int | None = Field(default=None, ge=2, le=8)
    quantize_input: bool = False
    input_bits: int = Field(default=8, ge=2, le=8)
    quantize_residual: bool = False
    weight_symmetric: bool = False
    weight_range: Literal["minmax", "lp"] = "minmax"
    act_range: Literal["minmax", "lp"] = "minmax"
    lp_norm: float = Field(default=2.4, gt=0.0)
    learn_weight_scale: bool = False
    learn_act_scale: bool = False
    ema_decay: float = Field(default=0.9, gt=0.0, lt=1.0)
    calibration_batches: int = Field(default=8, ge=1)
    reconstruct: ReconstructConfig = Field(default_factory=ReconstructConfig)
    # SQuant: the kernel (K) and output-channel (C) flip stages (both off = SQuant-E, nearest),
    # the activation clipping factor (None = the paper's value for the bit width) and the number
    # of BN-statistics samples (input-sized) its activation statistics are measured on.
    squant_kernel: bool = True
    squant_channel: bool = True
    squant_act_sigma: float | None = Field(default=None, gt=0.0)
    squant_act_images: int = Field(default=256, ge=1)

    @property
    def tag(self) -> str:
        return f"W{self.w_bits}A{self.a_bits}"

    @property
    def trains_act_scale(self) -> bool:
        """Whether activation step sizes are parameters (learned in distillation or reconstruction)."""
        return self.learn_act_scale or (self.method == "reconstruct" and self.reconstruct.learn_act_scale)

    @property
    def stores_weight_range(self) -> bool:
        """Whether weight quantizers keep a stored per-channel range (needed by reconstruction)."""
        return self.weight_range != "minmax" or self.learn_weight_scale or self.method == "reconstruct"

    @property
    def protocol(self) -> str:
        """Which layers are at which bits, in words (for results tables and reports)."""
        first = self.first_layer_bits
        last = self.last_layer_bits
        placement = (
            "activations at weight-layer inputs"
            if self.act_placement == "weight_inputs"
            else ("activations after activation functions")
        )
        if first is None and last is None and self.last_input_bits is None:
            return f"all layers W{self.w_bits}A{self.a_bits} ({placement})"
        parts = [f"W{self.w_bits}A{self.a_bits}"]
        if first is not None:
            parts.append(f"first layer {first}-bit weights")
        if last is not None:
            parts.append(f"last layer {last}-bit weights")
        if self.last_input_bits is not None:
            parts.append(f"last layer input {self.last_input_bits}-bit")
        return ", ".join(parts) + f" ({placement})"


class SynthConfig(StageConfig):
    """Synthesis of images by optimizing pixels against the frozen teacher.

    ``method`` picks a preset of loss weights; any weight given explicitly overrides the
    preset. Presets: ``intraq`` (BNS + SIL + MDC + LOR), ``bns_ce`` (BNS + hard-label CE,
    the ZeroQ/GDFQ-style baseline), ``adi`` (IntraQ with MDC replaced by DeepInversion's
    teacher–student competition term), ``gaussian`` (N(0,1) noise, no optimization) and
    ``custom`` (all weights as given, zero when absent).

    ``gdfq`` and ``qimera`` do not optimize pixels: they train a conditional generator against
    the teacher (CE + 0.1·BNS; Qimera adds boundary-supporting samples and its mapping layer),
    for ``generator_iterations`` steps of ``generator_batch_size`` images, then sample the plan's
    shards from it (``intraq_core.synth.generator``). Pixel keys (iterations, lr, LOR, SIL, MDC)
    do not apply to them.

    ``num_images`` may be smaller than the teacher's number of classes (256 images of a
    1,000-class ImageNet teacher, the IntraQ paper's Table 2): the ``balanced`` label plan then
    gives each image a different class, drawn without replacement from the seed
    (:func:`intraq_core.synth.labels.label_plan`). MDC compares an image with the centre of
    *earlier* images of its class, so with at most one image per class it never fires.

    ``micro_batch_size`` bounds the memory of one optimization batch: its passes run that many
    images at a time, and the loss and each Adam step are still those of the whole batch (exact
    BN statistics in two passes, :mod:`intraq_core.synth.engine`; equal up to float32 reduction
    order, so it is not part of the dataset's identity). ADI and the generator methods cannot
    be split exactly and refuse it. ``groups_per_pass`` packs that many batches of a round into
    one forward/backward pass, each with its own loss (its own BN statistics, SIL targets, LOR
    crops, MDC denominator), Adam state and plateau schedule, so each batch's images are those
    of its separate run up to float32 reduction order (not part of the dataset's identity either);
    it fills a GPU that one 256-image 32x32 batch leaves launch-bound. Not with micro-batches or
    ADI (whole-batch couplings), nor the generator methods. ``store_dtype`` is how shards store pixels: ``float16``
    halves the files (rounding error 2^-11 relative, 14x below the 8-bit step of a real image
    in normalized units), ``auto`` (default) picks float16 for images of at least 128 px and
    float32 below (CIFAR shards stay as they always were). Readers always get float32.
    """

    method: Literal["intraq", "bns_ce", "adi", "gaussian", "custom", "gdfq", "qimera"] = "intraq"
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
    # Generator methods (gdfq, qimera): the generator's training budget and Adam step size
    # (betas 0.5, 0.999 as GDFQ), its latent size, and Qimera's boundary-supporting samples
    # (probability of a superposed batch / image, classes per superposition, mapping layer).
    generator_iterations: int = Field(default=2000, ge=1)
    generator_batch_size: int = Field(default=200, ge=2)
    generator_lr: float = Field(default=1e-3, gt=0.0)
    generator_latent_dim: int = Field(default=100, ge=2)
    qimera_mix_prob: float = Field(default=0.4, ge=0.0, le=1.0)
    qimera_mix_classes: int = Field(default=2, ge=2)
    qimera_mapping: bool = True
    # Engineering knob: iterations between generator checkpoints (resume points).
    generator_checkpoint_every: int = Field(default=50, ge=1)
    # Engineering knobs (do not change the method).
    shards_per_round: int = Field(default=4, ge=1)
    channels_last: bool = True
    compile: bool = False
    amp: Literal["off", "bf16"] = "off"
    # Images per forward/backward pass of an optimization batch (None: the whole batch).
    micro_batch_size: int | None = Field(default=None, ge=1)
    # Batches of a round optimized together in one pass, each with its own loss (1: one at a time).
    groups_per_pass: int = Field(default=1, ge=1)
    # Pixel storage of the shards (auto: float16 from FLOAT16_MIN_SIZE px up, float32 below).
    store_dtype: Literal["auto", "float32", "float16"] = "auto"

    @model_validator(mode="after")
    def _check(self) -> SynthConfig:
        if self.mdc_lower > self.mdc_upper:
            raise ValueError("synth.mdc_lower must be <= synth.mdc_upper")
        if self.micro_batch_size is not None:
            if self.uses_generator:
                raise ValueError(
                    f"generate.micro_batch_size does not apply to generate.method={self.method}: its generator "
                    "normalizes with the statistics of the whole batch; leave micro_batch_size unset"
                )
            if self.weights()["adi"] > 0:
                raise ValueError(
                    "generate.micro_batch_size cannot keep the ADI term exact: its quantized student takes "
                    "activation ranges from the whole batch; leave micro_batch_size unset or set adi_weight=0"
                )
        if self.groups_per_pass > 1:
            if self.uses_generator:
                raise ValueError(
                    f"generate.groups_per_pass does not apply to generate.method={self.method}: it packs pixel "
                    "optimizations; leave groups_per_pass at 1"
                )
            if self.weights()["adi"] > 0:
                raise ValueError(
                    "generate.groups_per_pass cannot keep the ADI term per batch: its quantized student takes "
                    "activation ranges from the whole pass; leave groups_per_pass at 1 or set adi_weight=0"
                )
            if self.micro_batch_size is not None:
                raise ValueError(
                    "generate.groups_per_pass and generate.micro_batch_size do not combine (one packs batches "
                    "for throughput, the other splits a batch for memory); set only one"
                )
        return self

    def shard_dtype(self, image_size: int) -> Literal["float32", "float16"]:
        """The pixel dtype of the shards of ``image_size`` px images (``store_dtype`` resolved)."""
        if self.store_dtype != "auto":
            return self.store_dtype
        return "float16" if image_size >= FLOAT16_MIN_SIZE else "float32"

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

    @property
    def uses_generator(self) -> bool:
        """Whether images come from a trained conditional generator (gdfq, qimera)."""
        return self.method in ("gdfq", "qimera")


#: ``store_dtype: auto`` stores images of at least this many pixels a side in float16.
FLOAT16_MIN_SIZE = 128

SYNTH_PRESETS: dict[str, dict[str, float]] = {
    "intraq": {"bns": 1.0, "sil": 1.0, "mdc": 1.0, "lor": 1.0},
    "bns_ce": {"bns": 1.0, "ce": 1.0},
    "adi": {"bns": 1.0, "sil": 1.0, "adi": 1.0, "lor": 1.0},
    "gaussian": {},
    "custom": {},
    "gdfq": {"bns": 0.1, "ce": 1.0},
    "qimera": {"bns": 0.1, "ce": 1.0},
}


class DistillConfig(StageConfig):
    """Quantization-aware distillation of the student from the frozen teacher.

    Loss = kd_alpha * T^2 * KL(teacher/T || student/T) + ce_weight * CE(student, label).
    The reference uses kd_alpha = T = 20 and lr 1e-4, which diverges on the shared
    CIFAR-10 teacher; the defaults here are the stable recipe (alpha 1, T 4, lr 1e-3,
    cosine decay) chosen by the data-free agreement check. ``epochs: 0`` skips distillation: the
    quantized student (calibrated, or SQuant's) is the final model.
    """

    epochs: int = Field(default=50, ge=0)
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
    # Optimizer of the weights and BN affine parameters; quantizer step sizes (LSQ) get their
    # own group without weight decay at ``scale_lr`` (``lr`` when None).
    optimizer: Literal["sgd", "adam"] = "sgd"
    scale_lr: float | None = Field(default=None, gt=0.0)
    train_bn_affine: bool = True
    # SynQ's difficulty-gated CE: the hard-label CE counts only on images whose difficulty
    # 1 - p_teacher(label) is below this threshold, i.e. where the teacher agrees with the label;
    # the soft KD term covers the difficult rest (None: CE on every image).
    ce_difficulty_below: float | None = Field(default=None, gt=0.0, le=1.0)
    # SynQ's data-side options: a Gaussian low-pass filter of cutoff ``lowpass_cutoff`` (in
    # frequency-grid units) applied to every training batch (teacher and student both see the
    # filtered images), and Grad-CAM alignment of the student's last feature map with the
    # teacher's (MSE of min-max normalized maps, weight ``cam_weight``).
    lowpass_cutoff: float | None = Field(default=None, gt=0.0)
    cam_weight: float = Field(default=0.0, ge=0.0)
    # Self-watching (intraq_core.selection): the student is scored against the teacher on the
    # held-out synthetic images (and the probe set) at the start, every ``eval_every`` epochs
    # and at the end; ``select: best`` keeps the best-scoring state when the final one is worse,
    # ``final`` always keeps the final student.
    select: Literal["best", "final"] = "best"
    # Augmented views (the training augmentation, fixed seed) of each held-out image the guard
    # scores besides the image itself.
    watch_views: int = Field(default=3, ge=0)
    # A run location whose synthetic images are the probe set (images of another kind or seed,
    # e.g. `intraq-pipeline generate -c configs/probe_cpu.yaml`): the guard also scores the
    # student on them and vetoes a candidate that collapsed on them (None: held-out split only).
    probe: str | None = None
    # Cadence, in epochs (None: a tenth of the run); both also fall on the last epoch.
    # checkpoint_every: resume points (train_state.pt locally, Ray Train checkpoints on Ray).
    # eval_every: the data-free score of the student (intraq_core.selection), recorded in the history.
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
    ``labels``), ``torchvision:cifar10`` / ``torchvision:cifar100`` (downloaded into ``root``
    when missing), an ImageFolder directory (one sub-folder of images per class) or, with
    ``labels``, a flat folder of images (the official ImageNet validation layout).

    ``classes`` is the model's class list in output order: ``imagenet1k`` (built in: the 1000
    sorted WordNet ids) or a file with one class a line, the first whitespace-separated token
    being its id (``<wnid> <names>`` lines work). With it, the sub-folders of an ImageFolder are
    labelled by their position in the list, so a subset of the classes evaluates; without it an
    ImageFolder must hold exactly the model's classes (labelled in sorted folder order).
    ``labels`` is the ground-truth file of a flat folder: ``<file name> <class>`` lines, the
    class a 0-based index in the model's order or an id of ``classes``. (The devkit's
    one-index-per-line file is refused: its indices follow the devkit's own class order.)

    Images are preprocessed by the model spec (``model.resize``/``crop_pct``/``interpolation``,
    see :class:`ModelConfig`). ``resize``/``crop`` here are deprecated overrides of
    ``model.resize``/``model.image_size`` (a warning says so). ``num_workers`` processes decode
    image files in parallel (None: min(4, CPUs)); the order of the images never depends on it.
    """

    data: str = "cifar10-test"
    root: str | None = None
    classes: str | None = None
    labels: str | None = None
    batch_size: int = Field(default=500, ge=1)
    resize: int | None = Field(default=None, ge=1)
    crop: int | None = Field(default=None, ge=1)
    limit: int | None = Field(default=None, ge=1)
    num_workers: int | None = Field(default=None, ge=0)
