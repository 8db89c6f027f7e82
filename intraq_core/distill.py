"""Quantization-aware distillation of the quantized student from the frozen teacher.

:class:`Distiller` owns one training step (augmentation, KD + CE loss, SGD-Nesterov
update, per-step learning-rate schedule). :func:`train_epochs` is THE epoch loop: the local
executor (through :func:`distill`), every Ray Train worker and every Tune trial run it, so
they all train the same way. What differs between them is passed in: where a batch comes
from (:class:`EpochBatches` over in-memory images, or a stream), how the epoch statistics
and the held-out agreement are summed over workers (``reduce``), and what happens at a
checkpoint or after an epoch (hooks).

Cadence: the student is scored by the data-free selector (:mod:`intraq_core.selection`:
held-out synthetic images and their augmented views) every ``distill.eval_every`` epochs and a
checkpoint taken every ``distill.checkpoint_every`` epochs (both default to a tenth of the
run), and both at the last epoch. The history row of an evaluated epoch carries
``holdout_agreement`` / ``holdout_kl``. The loop ends with the best-scoring student when the
final one is worse (``distill.select: best``), so no executor can return a destroyed student.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from intraq_core.config import DistillConfig
from intraq_core.distill_losses import (
    LastFeatureMap,
    augment_batch,
    gated_cross_entropy,
    grad_cam,
    kd_loss,
    lowpass_filter,
)
from intraq_core.errors import DivergenceError
from intraq_core.quant import is_step_size
from intraq_core.seeding import PURPOSE_DISTILL, derive_seed
from intraq_core.selection import Selection, Selector


def lr_factor(cfg: DistillConfig, step: int, steps_per_epoch: int) -> float:
    """Multiplier of the base learning rate at a global step (cosine, step or constant)."""
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))
    if cfg.schedule == "step":
        epoch = step // max(steps_per_epoch, 1)
        return cfg.gamma ** sum(1 for m in cfg.milestones if epoch >= m)
    return 1.0


def build_optimizer(student: nn.Module, cfg: DistillConfig) -> torch.optim.Optimizer:
    """SGD-Nesterov (or Adam) over the trainable weights; step sizes in their own group.

    Groups: conv/linear weights and biases (``weight_decay``), BN affine parameters (trained
    when ``train_bn_affine``, weight decay too, as the reference), quantizer step sizes (no
    weight decay, learning rate ``scale_lr``). Each group records its ``base_lr``.
    """
    bn_params = {
        id(p) for m in student.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for p in m.parameters()
    }
    weights, scales = [], []
    for name, p in student.named_parameters():
        if not p.requires_grad:
            continue
        if is_step_size(name):
            scales.append(p)
        elif id(p) in bn_params and not cfg.train_bn_affine:
            continue
        else:
            weights.append(p)
    groups = [{"params": weights, "lr": cfg.lr, "base_lr": cfg.lr, "weight_decay": cfg.weight_decay}]
    if scales:
        scale_lr = cfg.scale_lr if cfg.scale_lr is not None else cfg.lr
        groups.append({"params": scales, "lr": scale_lr, "base_lr": scale_lr, "weight_decay": 0.0})
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups)
    return torch.optim.SGD(groups, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)


@dataclass
class StepStats:
    loss: float
    kd: float
    ce: float
    agreement: float
    lr: float


@dataclass
class DistillHistory:
    """Per-epoch averages of the training step statistics, and what the selector kept."""

    epochs: list[dict[str, Any]] = field(default_factory=list)
    selection: Selection | None = None


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
        self.optimizer = build_optimizer(self.student, cfg)
        self.step_count = 0
        self.generator = torch.Generator().manual_seed(derive_seed(seed, PURPOSE_DISTILL))
        if cfg.cam_weight > 0:
            self.teacher.requires_grad_(False)
            self._teacher_map = LastFeatureMap(self.teacher)
            self._student_map = LastFeatureMap(self.student)

    def _set_lr(self) -> float:
        factor = lr_factor(self.cfg, self.step_count, self.steps_per_epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        return self.cfg.lr * factor

    def loss(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(total, kd, ce, student logits, teacher logits) on an already augmented batch."""
        cam = self.cfg.cam_weight > 0
        if cam:
            with torch.enable_grad():  # the input needs grad so the teacher's feature map has a graph
                t_logits = self.teacher(x.detach().requires_grad_(True))
                t_map = grad_cam(self._teacher_map.value, t_logits, t_logits.argmax(1), keep_graph=False)
            t_logits = t_logits.detach()
        else:
            with torch.no_grad():
                t_logits = self.teacher(x)
        s_logits = self.student(x)
        kd = kd_loss(s_logits, t_logits, self.cfg.kd_temperature)
        ce = gated_cross_entropy(s_logits, t_logits, y, self.cfg.ce_difficulty_below)
        total = self.cfg.kd_alpha * kd + self.cfg.ce_weight * ce
        if cam:
            s_map = grad_cam(self._student_map.value, s_logits, t_logits.argmax(1), keep_graph=True)
            total = total + self.cfg.cam_weight * F.mse_loss(s_map, t_map)
        return total, kd, ce, s_logits, t_logits

    def step(self, x: torch.Tensor, y: torch.Tensor) -> StepStats:
        """One augmented training step; raises DivergenceError on a non-finite loss."""
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True).long()
        x = augment_batch(x, self.cfg, self.generator)
        if self.cfg.lowpass_cutoff is not None:
            x = lowpass_filter(x, self.cfg.lowpass_cutoff)
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

    @property
    def module(self) -> nn.Module:
        """The student itself, unwrapped from a data-parallel wrapper (DDP) if there is one."""
        return bare_module(self.student)

    def state_dict(self) -> dict:
        """Everything needed to resume: student, optimizer, step, augmentation RNG.

        The student's keys are those of the bare module (no DDP ``module.`` prefix), so a state
        saved by any number of workers loads into any other number, or into a plain process.
        """
        return {
            "student": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step_count,
            "rng": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_count = int(state["step"])
        self.generator.set_state(state["rng"])

    def resume(self, start: dict) -> tuple[int, list[dict[str, Any]]]:
        """Continue from a checkpoint ``{"distiller": state_dict(), "history": [...], "epoch": e}``:
        loads the state; returns the first epoch to run (``e + 1``) and the history so far."""
        self.load_state_dict(start["distiller"])
        return int(start["epoch"]) + 1, list(start["history"])


def bare_module(model: nn.Module) -> nn.Module:
    """``model`` without its DistributedDataParallel (or DataParallel) wrapper."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else model


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
    """Optimizer steps in one epoch for ``n`` training images at the global ``distill.batch_size``.

    The same for any number of data-parallel workers: each of N workers takes batch_size / N
    images per step, so N workers take the steps of one process with the full batch.
    """
    if cfg.iterations_per_epoch is not None:
        return cfg.iterations_per_epoch
    return max(1, n // cfg.batch_size) if n >= cfg.batch_size else 1


def cadence(every: int | None, epochs: int) -> int:
    """Epochs between two checkpoints (or held-out evaluations): ``every``, else a tenth of the run."""
    return max(1, every if every is not None else epochs // 10)


def is_due(epoch: int, every: int, epochs: int) -> bool:
    """Whether a cadence of ``every`` epochs falls on ``epoch`` (the last epoch always does)."""
    return (epoch + 1) % every == 0 or epoch == epochs - 1


Batch = tuple[torch.Tensor, torch.Tensor]


class EpochBatches:
    """The batches of every epoch from images held in memory (a CPU or GPU tensor).

    Epoch ``e`` is :func:`epoch_batches` of the images: a shuffle seeded by ``(seed, e)``, so
    the order of an epoch does not depend on what ran before it (exact resume), cycled to
    ``steps`` batches.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *, steps: int, seed: int) -> None:
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        if images.shape[0] == 0:
            raise ValueError("no training images")
        self.images, self.labels = images, labels
        self.batch_size, self.steps, self.seed = batch_size, steps, seed

    def __call__(self, epoch: int) -> Iterator[Batch]:
        n = self.images.shape[0]
        for idx in epoch_batches(n, self.batch_size, epoch, self.seed, self.steps):
            idx = idx.to(self.images.device)
            yield self.images[idx], self.labels[idx]


def train_epochs(
    distiller: Distiller,
    batches: Callable[[int], Iterable[Batch]],
    *,
    first_epoch: int = 0,
    history: list[dict[str, Any]] | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    selector: Selector | None = None,
    before_epoch: Callable[[int], None] | None = None,
    checkpoint: Callable[[int, Distiller, list[dict[str, Any]]], None] | None = None,
    on_epoch: Callable[[int, Distiller, list[dict[str, Any]]], None] | None = None,
    tags: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> DistillHistory:
    """Run epochs ``first_epoch .. distill.epochs - 1`` of ``distiller``: the one training loop.

    * ``batches(epoch)`` yields this process's ``(images, labels)`` batches of that epoch;
    * ``reduce(t)`` sums a float64 tensor over all data-parallel workers (None: one process), so
      the epoch statistics are means over every step of every worker;
    * ``selector`` (:class:`~intraq_core.selection.Selector`, summing over workers itself)
      scores the starting student (unless a resumed selector already did), the student every
      ``distill.eval_every`` epochs and at the last (``holdout_agreement`` / ``holdout_kl`` and
      ``probe_*`` in those rows), and at the end keeps the best one by its rule when
      ``distill.select`` is ``best``: :attr:`DistillHistory.selection` says what was kept;
    * ``before_epoch(epoch)`` runs first; ``checkpoint(epoch, distiller, rows)`` every
      ``distill.checkpoint_every`` epochs and at the last; ``on_epoch(epoch, distiller, rows)``
      after every epoch. ``tags`` are added to every history row this call writes.

    Returns the history: ``history`` (rows of earlier epochs, e.g. from a checkpoint) plus one
    row per epoch run. Rows hold only values determined by the config and seed, never times.
    """
    cfg = distiller.cfg
    rows = DistillHistory([dict(row) for row in history or []])
    eval_every = cadence(cfg.eval_every, cfg.epochs)
    ckpt_every = cadence(cfg.checkpoint_every, cfg.epochs)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        spe = distiller.steps_per_epoch
        bar = tqdm(total=cfg.epochs * spe, initial=first_epoch * spe, desc="distill", unit="step", leave=False)
    if selector is not None and not selector.started:
        selector.start(distiller.module)
    try:
        for epoch in range(first_epoch, cfg.epochs):
            if before_epoch is not None:
                before_epoch(epoch)
            sums = torch.zeros(5, dtype=torch.float64)  # loss, kd, ce, agreement, steps
            lr = 0.0
            for x, y in batches(epoch):
                stats = distiller.step(x, y)
                sums += torch.tensor([stats.loss, stats.kd, stats.ce, stats.agreement, 1.0], dtype=torch.float64)
                lr = stats.lr
                if bar is not None:
                    bar.update(1)
            if reduce is not None:
                sums = reduce(sums)
            steps = max(float(sums[4]), 1.0)
            row: dict[str, Any] = {
                "loss": float(sums[0]) / steps,
                "kd": float(sums[1]) / steps,
                "ce": float(sums[2]) / steps,
                "agreement": float(sums[3]) / steps,
                "epoch": epoch,
                "lr": lr,
                "step": distiller.step_count,
            }
            if selector is not None and is_due(epoch, eval_every, cfg.epochs):
                scores = selector.consider(distiller.module, epoch)
                row["holdout_agreement"] = scores.pop("agreement")
                row["holdout_kl"] = scores.pop("kl")
                row.update(scores)
                if epoch == cfg.epochs - 1:  # keep the best student before the last checkpoint
                    rows.selection = selector.finish(distiller.module, epoch, cfg.select)
            row.update(tags or {})
            rows.epochs.append(row)
            if bar is not None:
                bar.set_postfix(loss=f"{row['loss']:.3f}", agree=f"{row['agreement']:.3f}")
            if checkpoint is not None and is_due(epoch, ckpt_every, cfg.epochs):
                checkpoint(epoch, distiller, rows.epochs)
            if on_epoch is not None:
                on_epoch(epoch, distiller, rows.epochs)
    finally:
        if bar is not None:
            bar.close()
    if selector is not None and rows.selection is None:  # no epoch left to run (resumed, or none)
        rows.selection = selector.finish(distiller.module, cfg.epochs - 1 if cfg.epochs > 0 else None, cfg.select)
    return rows


def distillation_selector(
    teacher: nn.Module,
    holdout: torch.Tensor | Callable[[], Iterable[torch.Tensor]] | None,
    cfg: DistillConfig,
    *,
    probe: torch.Tensor | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Selector:
    """The data-free selector of a distillation with ``cfg``: the held-out images and
    ``cfg.watch_views`` views of each under the training augmentation (drawn at ``seed``), the
    probe set if any, at the ``cfg.eval_every`` cadence; ``reduce`` sums over workers."""
    return Selector(
        teacher,
        holdout,
        probe,
        every=cadence(cfg.eval_every, cfg.epochs),
        device=device,
        augment=lambda x, gen: augment_batch(x, cfg, gen),
        views=cfg.watch_views,
        seed=seed,
        reduce=reduce,
    )


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
    selector: Selector | None = None,
    before_epoch: Callable[[int], None] | None = None,
    checkpoint: Callable[[int, Distiller, list[dict[str, Any]]], None] | None = None,
    on_epoch: Callable[[int, Distiller, list[dict[str, Any]]], None] | None = None,
) -> DistillHistory:
    """Single-process distillation over in-memory synthetic images (the laptop path).

    :func:`train_epochs` over :class:`EpochBatches` of ``images``. ``start`` =
    ``{"distiller": Distiller.state_dict(), "history": [...], "epoch": e}`` resumes after epoch
    ``e`` exactly as if training had never stopped (the batch order and the augmentation RNG are
    seeded per run). ``selector`` watches the student on images it never trains on and keeps
    the best state (see :func:`train_epochs`); a resumed run passes the selector restored from
    the same checkpoint (:meth:`~intraq_core.selection.Selector.load_state`).
    """
    n = images.shape[0]
    spe = steps_per_epoch(n, cfg)
    distiller = Distiller(student, teacher, cfg, steps_per_epoch=spe, seed=seed, device=device)
    first, history = distiller.resume(start) if start is not None else (0, [])
    return train_epochs(
        distiller,
        EpochBatches(images, labels, cfg.batch_size, steps=spe, seed=seed),
        first_epoch=first,
        history=history,
        selector=selector,
        before_epoch=before_epoch,
        checkpoint=checkpoint,
        on_epoch=on_epoch,
        progress=progress,
    )


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
