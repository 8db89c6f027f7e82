"""The distillation stage's config (:class:`DistillConfig`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from intraq_core.config.stage import StageConfig


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
