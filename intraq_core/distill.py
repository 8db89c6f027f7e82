"""Quantization-aware distillation of the quantized student from the frozen teacher.

:class:`Distiller` owns one training step (augmentation, KD + CE loss, SGD-Nesterov
update, per-step learning-rate schedule). The single-process loop :func:`distill` and the
Ray Train worker loop both drive it, so both train the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from intraq_core.config import DistillConfig
from intraq_core.errors import DivergenceError
from intraq_core.seeding import PURPOSE_DISTILL, derive_seed
from intraq_core.synth.lor import apply_lor, sample_lor_params


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(z_t / T) || softmax(z_s / T)), batch mean (Hinton's scaling)."""
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)


def lr_factor(cfg: DistillConfig, step: int, steps_per_epoch: int) -> float:
    """Multiplier of the base learning rate at a global step (cosine, step or constant)."""
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))
    if cfg.schedule == "step":
        epoch = step // max(steps_per_epoch, 1)
        return cfg.gamma ** sum(1 for m in cfg.milestones if epoch >= m)
    return 1.0


def augment_batch(x: torch.Tensor, cfg: DistillConfig, generator: torch.Generator) -> torch.Tensor:
    """On-the-fly RandomResizedCrop(scale = crop_scale) + horizontal flip of stored images."""
    lo, hi = cfg.crop_scale
    if lo >= 1.0 and not cfg.flip:
        return x
    _, _, height, width = x.shape
    params = sample_lor_params(x.shape[0], height, width, min_area=lo, max_area=hi, generator=generator, flip=cfg.flip)
    return apply_lor(x, params)


@dataclass
class StepStats:
    loss: float
    kd: float
    ce: float
    agreement: float
    lr: float


@dataclass
class DistillHistory:
    """Per-epoch averages of the training step statistics."""

    epochs: list[dict[str, float]] = field(default_factory=list)


class Distiller:
    """One optimizer, one schedule, one loss: the unit both training loops drive.

    The student stays in eval mode (BN running statistics frozen, BN affine parameters
    trained, activation ranges frozen), as in the reference; the teacher is frozen.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        cfg: DistillConfig,
        *,
        steps_per_epoch: int,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self.student = student.to(self.device).eval()
        self.teacher = teacher.to(self.device).eval().requires_grad_(False)
        self.steps_per_epoch = max(1, steps_per_epoch)
        params = [p for p in self.student.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(
            params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov and cfg.momentum > 0,
            weight_decay=cfg.weight_decay,
        )
        self.step_count = 0
        self.generator = torch.Generator().manual_seed(derive_seed(seed, PURPOSE_DISTILL))

    def _set_lr(self) -> float:
        lr = self.cfg.lr * lr_factor(self.cfg, self.step_count, self.steps_per_epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def loss(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(total, kd, ce, student logits, teacher logits) on an already augmented batch."""
        with torch.no_grad():
            t_logits = self.teacher(x)
        s_logits = self.student(x)
        kd = kd_loss(s_logits, t_logits, self.cfg.kd_temperature)
        ce = F.cross_entropy(s_logits.float(), y)
        total = self.cfg.kd_alpha * kd + self.cfg.ce_weight * ce
        return total, kd, ce, s_logits, t_logits

    def step(self, x: torch.Tensor, y: torch.Tensor) -> StepStats:
        """One augmented training step; raises DivergenceError on a non-finite loss."""
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True).long()
        x = augment_batch(x, self.cfg, self.generator)
        lr = self._set_lr()
        total, kd, ce, s_logits, t_logits = self.loss(x, y)
        if not torch.isfinite(total):
            raise DivergenceError(
                f"distillation loss became {total.item()} at step {self.step_count} (lr {lr:g}, "
                f"kd_alpha {self.cfg.kd_alpha:g}, T {self.cfg.kd_temperature:g}): the recipe is unstable; "
                "lower distill.lr or distill.kd_alpha"
            )
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if self.cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.step_count += 1
        agree = (s_logits.argmax(1) == t_logits.argmax(1)).float().mean()
        return StepStats(total.item(), kd.item(), ce.item(), agree.item(), lr)

    def state_dict(self) -> dict:
        """Everything needed to resume: student, optimizer, step, augmentation RNG."""
        return {
            "student": self.student.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step_count,
            "rng": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.student.load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_count = int(state["step"])
        self.generator.set_state(state["rng"])


def epoch_batches(
    n: int, batch_size: int, epoch: int, seed: int, iterations: int | None = None
) -> Iterator[torch.Tensor]:
    """Index batches for one epoch: a seeded shuffle, drop_last, optionally a fixed count.

    With ``iterations`` set (the reference's 200 iterations per epoch), the shuffled order
    is cycled until that many batches were produced.
    """
    gen = torch.Generator().manual_seed(derive_seed(seed, PURPOSE_DISTILL, 1 + epoch))
    per_pass = max(1, n // batch_size) if n >= batch_size else 1
    count = iterations if iterations is not None else per_pass
    produced = 0
    while produced < count:
        order = torch.randperm(n, generator=gen)
        for b in range(per_pass):
            if produced >= count:
                return
            yield order[b * batch_size : (b + 1) * batch_size]
            produced += 1


def steps_per_epoch(n: int, cfg: DistillConfig) -> int:
    """Number of optimizer steps in one epoch for ``n`` training images."""
    if cfg.iterations_per_epoch is not None:
        return cfg.iterations_per_epoch
    return max(1, n // cfg.batch_size) if n >= cfg.batch_size else 1


def distill(
    student: nn.Module,
    teacher: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    cfg: DistillConfig,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    start: dict | None = None,
    before_epoch: Callable[[int], None] | None = None,
    on_epoch: Callable[[int, Distiller, list[dict[str, float]]], None] | None = None,
) -> DistillHistory:
    """Single-process distillation over in-memory synthetic images (the laptop path).

    ``start`` = ``{"distiller": Distiller.state_dict(), "history": [...], "epoch": e}`` resumes
    after epoch ``e`` exactly as if training had never stopped (the batch order and the
    augmentation RNG are seeded per run). ``before_epoch(epoch)`` runs before and
    ``on_epoch(epoch, distiller, history)`` after every epoch (e.g. to write a checkpoint).
    """
    from tqdm.auto import tqdm

    n = images.shape[0]
    spe = steps_per_epoch(n, cfg)
    distiller = Distiller(student, teacher, cfg, steps_per_epoch=spe, seed=seed, device=device)
    history = DistillHistory()
    first = 0
    if start is not None:
        distiller.load_state_dict(start["distiller"])
        history.epochs = [dict(row) for row in start["history"]]
        first = int(start["epoch"]) + 1
    bar = tqdm(
        total=cfg.epochs * spe, initial=first * spe, desc="distill", unit="step", disable=not progress, leave=False
    )
    for epoch in range(first, cfg.epochs):
        if before_epoch is not None:
            before_epoch(epoch)
        sums = {"loss": 0.0, "kd": 0.0, "ce": 0.0, "agreement": 0.0}
        count = 0
        for idx in epoch_batches(n, cfg.batch_size, epoch, seed, cfg.iterations_per_epoch):
            stats = distiller.step(images[idx], labels[idx])
            for k in sums:
                sums[k] += getattr(stats, k)
            count += 1
            bar.update(1)
        row = {k: v / count for k, v in sums.items()}
        row["epoch"] = epoch
        row["lr"] = stats.lr
        history.epochs.append(row)
        bar.set_postfix(loss=f"{row['loss']:.3f}", agree=f"{row['agreement']:.3f}")
        if on_epoch is not None:
            on_epoch(epoch, distiller, history.epochs)
    bar.close()
    return history


@torch.no_grad()
def reestimate_bn(model: nn.Module, batches: Iterator[torch.Tensor], device: str | torch.device = "cpu") -> int:
    """Recompute BN running statistics of ``model`` as a cumulative average over batches.

    Only BN layers run in train mode; everything else (including activation quantizers)
    stays in eval mode. Returns the number of batches seen.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.training) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    count = 0
    try:
        for x in batches:
            model(x.to(device))
            count += 1
    finally:
        for m, (momentum, training) in zip(bns, saved, strict=True):
            m.momentum = momentum
            m.train(training)
    return count
