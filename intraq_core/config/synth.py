"""The synthesis stage's config (:class:`SynthConfig`) and its methods' presets of loss weights."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from intraq_core.config.stage import StageConfig


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
    # Many-class teachers: the fewest images per class the plan gives (0: off). With K classes and
    # fewer than min_images_per_class x K images, the plan grows to that many (whole batches) and
    # the iterations shrink so that images x iterations stays this config's budget, never below
    # RULE_MIN_ITERATIONS (:meth:`for_classes`; the run resolves it once, when it opens).
    min_images_per_class: float = Field(default=0.0, ge=0.0)
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
    # torch.compile of the teacher's forward/backward: 1.25x (32x32) to 1.4x (224x224) faster
    # synthesis on a CPU (benchmarks/results/gen_speed.md), the same accuracy within 0.06 points on
    # the W4A4 CPU config; off by default (a C++ compiler at run time, compile time per process,
    # float32 rounding that differs from eager).
    compile: bool = False
    # bf16 autocast of the teacher's forward (the BN-statistics loss, its reductions and Adam stay
    # float32): for GPUs and CPUs with native bf16 dot products; refused on other CPUs, where torch
    # emulates bf16 ~15x slower than float32 (intraq_core.synth.engine.check_amp).
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

    def for_classes(self, num_classes: int) -> SynthConfig:
        """This config for a teacher of ``num_classes`` classes: ``min_images_per_class`` applied.

        A plan below the floor grows to ``ceil(min_images_per_class * K)`` images rounded up to whole
        batches, and its iterations shrink to keep ``num_images * iterations`` (rounded), but never below
        :data:`RULE_MIN_ITERATIONS` per image when the config had at least that many (on the shared ImageNet model 2,048
        images x 30 iterations kept 9.5% top-1 where 512 x 120 and 1,024 x 60 kept 15.6 / 15.0%:
        too few iterations leave the images under-optimized): a budget too small for the floor
        gives as many whole batches as it can at that many iterations. A plan at or above the
        floor is returned as it is, so applying it twice changes nothing.

        >>> cfg = SynthConfig(num_images=512, batch_size=256, iterations=120, min_images_per_class=1)
        >>> plan = cfg.for_classes(1000)
        >>> plan.num_images, plan.iterations
        (1024, 60)
        >>> cfg.for_classes(10) is cfg
        True
        >>> plan = cfg.for_classes(5000)  # 5,000 images would get 12 iterations: capped at 60
        >>> plan.num_images, plan.iterations
        (1024, 60)
        """
        floor = math.ceil(self.min_images_per_class * num_classes - 1e-9)
        if self.num_images >= floor:
            return self
        budget = self.num_images * self.iterations
        images = math.ceil(floor / self.batch_size) * self.batch_size
        if budget / images < RULE_MIN_ITERATIONS <= self.iterations:
            images = max(self.num_images, budget // RULE_MIN_ITERATIONS // self.batch_size * self.batch_size)
        if images <= self.num_images:
            return self
        iterations = max(1, round(budget / images))
        return self.model_copy(update={"num_images": images, "iterations": iterations})

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


#: The fewest iterations per image ``min_images_per_class`` trades iterations down to (SynthConfig.for_classes).
RULE_MIN_ITERATIONS = 60

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
