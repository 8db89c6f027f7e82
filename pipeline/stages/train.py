"""Training stage: synthetic shards → calibrated, distilled student checkpoint; the one training driver.

Steps: quantize a copy of the teacher and set its quantization parameters on synthetic images
(:mod:`pipeline.stages.calibration`), distil, and write the student. A held-out split of the
synthetic images (chosen by image index, so it is the same for every executor) is what the data-free
selector (:mod:`intraq_core.selection`) scores the student on before distillation, every
``distill.eval_every`` epochs and at the end; the run keeps the best-scoring student
(``distill.select: best``) and says so in ``metrics.json`` (``selected_epoch``,
``selection_rule``). The test set is never involved.

Two executors run the same loop (:func:`intraq_core.distill.train_epochs`) through the same driver,
:class:`Training`: ``local`` (this module, in-memory, :func:`train_local`) and ``ray``
(:mod:`pipeline.ray.train`, Ray Train workers over the shards). What is shared lives here:

* **The recipe does not depend on the number of workers.** ``distill.batch_size`` is the
  global batch; N workers take ``batch_size / N`` images each per step, and the steps per epoch
  (:func:`intraq_core.distill.steps_per_epoch` of the training images) and the learning-rate
  schedule are the same for every N. :class:`TrainOutcome` records ``train_workers``,
  ``global_batch_size`` and ``optimizer_steps`` (they go into ``metrics.json``).
* **One checkpoint format** (:mod:`pipeline.stages.train_state`), resumed by :meth:`Training.resume`.
* **Checkpoint cadence.** Every ``distill.checkpoint_every`` epochs (default: a tenth of the
  run) and at the last epoch; the local executor writes it in the background
  (:class:`~pipeline.stages.train_state.CheckpointWriter`) while the next epoch trains. The batch
  order of an epoch is seeded by the epoch and the augmentation RNG is part of the state, so a
  resumed run trains exactly (bit for bit) as an uninterrupted one.
* **The selector** (:func:`make_selector`) and its state (its scores and the best student so
  far) are part of the checkpoint, so a resumed run chooses exactly as an uninterrupted one.
* **One outcome** (:meth:`Training.report` → :meth:`TrainOutcome.from_report`) and **one set of
  outputs** (:func:`write_outputs`: ``student.pt``, ``train_history.json``).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from intraq_core.distill import Distiller, EpochBatches, steps_per_epoch, train_epochs
from intraq_core.quant.sensitivity import recorded_sensitivity
from intraq_core.selection import Selection
from intraq_core.student import student_checkpoint_bytes
from pipeline.config import RunConfig
from pipeline.context import KILL_AT_ENV, RunContext, kill_point
from pipeline.errors import InputError
from pipeline.stages.calibration import calibrate_student, prepare_student
from pipeline.stages.holdout import make_selector, selection_outcome, split_mask, training_images
from pipeline.stages.train_state import (
    TRAIN_STATE_PATH,
    CheckpointWriter,
    load_train_state,
    train_identity,
    train_state_bytes,
)
from pipeline.storage.manifest import Manifest
from pipeline.storage.shards import read_shard

log = logging.getLogger(__name__)

STUDENT_PATH = "student.pt"
CALIBRATED_PATH = "student_calibrated.pt"
TRAIN_HISTORY_PATH = "train_history.json"


@dataclass
class TrainOutcome:
    """Summary of the training stage (written into metrics.json)."""

    num_train: int
    num_holdout: int
    agreement_calibrated: dict[str, float] | None
    agreement_final: dict[str, float] | None
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds_calibrate: float = 0.0
    seconds_distill: float = 0.0
    #: Data-parallel workers (1 for the local executor).
    train_workers: int = 1
    #: Images per optimizer step over all workers (``distill.batch_size``: a batch larger than the training
    #: images is refused before any work, :func:`check_batch`, so this is the batch that ran).
    global_batch_size: int = 0
    steps_per_epoch: int = 0
    #: Optimizer steps taken in all (the same for any number of workers).
    optimizer_steps: int = 0
    #: Seconds from the start of the stage to the first training step (calibration, process and
    #: worker start-up, data loading), and the wall time of every epoch run by this call.
    startup_s: float = 0.0
    epoch_seconds: list[float] = field(default_factory=list)
    #: Where the training images were: ``memory`` (read once) or ``stream`` (one pass per epoch).
    data: str = "memory"
    #: The device the training steps ran on.
    device: str = "cpu"
    #: What the data-free selector saw and kept (:meth:`intraq_core.selection.Selection.summary`).
    selection: dict[str, Any] | None = None
    #: What each activation tensor costs alone after calibration, most costly first
    #: (:mod:`intraq_core.quant.sensitivity`; None when the calibration measured none).
    sensitivity: list[dict[str, Any]] | None = None

    def summary(self) -> dict[str, Any]:
        out = {
            "num_train_images": self.num_train,
            "num_holdout_images": self.num_holdout,
            "holdout_agreement_calibrated": self.agreement_calibrated,
            "holdout_agreement_final": self.agreement_final,
            "final_epoch": self.history[-1] if self.history else None,
            "train_workers": self.train_workers,
            "global_batch_size": self.global_batch_size,
            "steps_per_epoch": self.steps_per_epoch,
            "optimizer_steps": self.optimizer_steps,
            "data": self.data,
        }
        if self.sensitivity is not None:
            out["activation_sensitivity"] = self.sensitivity
        if self.selection is not None:
            out["selected_epoch"] = self.selection["selected_epoch"]
            out["selection_rule"] = self.selection["selection_rule"]
            out["kept_final"] = self.selection["kept_final"]
            out["evaluations"] = self.selection["evaluations"]
        return out

    @classmethod
    def from_report(
        cls,
        cfg: RunConfig,
        report: dict[str, Any],
        *,
        num_train: int,
        num_holdout: int,
        seconds_calibrate: float,
        seconds_distill: float,
        started: float,
        train_workers: int = 1,
        data: str = "memory",
        sensitivity: list[dict[str, Any]] | None = None,
    ) -> TrainOutcome:
        """The outcome of a training call from its :meth:`Training.report`; ``started`` is the
        stage's start (a Unix time); ``sensitivity``: what the calibrated student recorded. Logs what
        the selector kept when it is not the final student
        (the run's summary line says it on the terminal)."""
        selection = report["selection"]
        if selection is not None and not selection["kept_final"]:
            log.info("%s", Selection.from_summary(selection).message)
        loop_start = report["loop_start_unix"]
        return cls(
            num_train,
            num_holdout,
            report["agreement_calibrated"],
            report["agreement_final"],
            list(report["history"]),
            seconds_calibrate,
            seconds_distill,
            train_workers=train_workers,
            global_batch_size=cfg.distill.batch_size,
            steps_per_epoch=int(report["steps_per_epoch"]),
            optimizer_steps=int(report["optimizer_steps"]),
            startup_s=(loop_start if loop_start is not None else time.time()) - started,
            epoch_seconds=list(report["epoch_seconds"]),
            data=data,
            device=str(report["device"]),
            selection=selection,
            sensitivity=sensitivity,
        )


def check_batch(cfg: RunConfig, num_images: int, *, source: str) -> None:
    """``distill.batch_size`` fits in the training images of a dataset of ``num_images`` (those not held out).

    With a larger batch every step would train on the whole training set, fewer images than the
    recipe (and ``metrics.json``'s ``global_batch_size``) says: refused in one line before any work,
    so ``global_batch_size`` is always the batch that ran. Nothing to check without distillation
    (``distill.epochs: 0``).
    """
    d = cfg.distill
    if d.epochs == 0:
        return
    num_train = training_images(num_images, cfg.seed, d.holdout_fraction)
    if d.batch_size <= num_train:
        return
    raise InputError(
        f"distill.batch_size={d.batch_size} is larger than the {num_train} training images ({source}: "
        f"{num_images} synthetic images, {num_images - num_train} held out by distill.holdout_fraction="
        f"{d.holdout_fraction}): every step would train on {num_train} images, not {d.batch_size}; set "
        f"distill.batch_size to at most {num_train}, or generate more images (generate.num_images)"
    )


def load_dataset(ctx: RunContext, manifest: Manifest) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """All shards of the manifest in memory, in global image-index order: (images, labels, indices)."""
    storage = ctx.dataset_storage
    images, labels, indices = [], [], []
    for entry in manifest.shards:
        shard = read_shard(storage, entry.path)
        images.append(shard.images)
        labels.append(shard.labels)
        indices.append(shard.indices)
    x, y, idx = np.concatenate(images), np.concatenate(labels), np.concatenate(indices)
    if idx.size > 1 and not (np.diff(idx) > 0).all():  # planned datasets already are in order
        order = np.argsort(idx, kind="stable")
        x, y, idx = x[order], y[order], idx[order]
    return torch.from_numpy(x), torch.from_numpy(y), idx


def quantize_only(ctx: RunContext) -> TrainOutcome:
    """The student of a run that needs no images (SQuant with ``distill.epochs: 0``).

    Writes it as both the calibrated and the final student (there is no distillation, no dataset
    and so no held-out agreement).
    """
    teacher = ctx.teacher().to(ctx.device)
    t0 = time.perf_counter()
    student = calibrate_student(ctx, teacher, [])
    seconds = time.perf_counter() - t0
    sensitivity = write_calibrated(ctx, student)
    write_outputs(ctx, student, [])
    return TrainOutcome(0, 0, None, None, [], seconds, 0.0, sensitivity=sensitivity)


def write_outputs(ctx: RunContext, student: torch.nn.Module, history: list[dict[str, Any]]) -> None:
    """The training stage's results: ``student.pt`` (the kept student) and ``train_history.json``."""
    ctx.storage.write_bytes_atomic(
        STUDENT_PATH, student_checkpoint_bytes(student, ctx.model_cfg, ctx.cfg.quant, {"stage": "final"})
    )
    ctx.storage.write_bytes_atomic(TRAIN_HISTORY_PATH, json.dumps(history, indent=1).encode())


def write_calibrated(ctx: RunContext, student: torch.nn.Module) -> list[dict[str, Any]] | None:
    """``student_calibrated.pt``: the student after range calibration, before distillation.

    Returns the activation-sensitivity ranking its calibration recorded on it (None when it took
    none), which the stage's :class:`TrainOutcome` carries into ``metrics.json``.
    """
    ctx.storage.write_bytes_atomic(
        CALIBRATED_PATH, student_checkpoint_bytes(student, ctx.model_cfg, ctx.cfg.quant, {"stage": "calibrated"})
    )
    return recorded_sensitivity(student)


class EpochClock:
    """Start-up and per-epoch wall times of one training call (for throughput, never in the history).

    Unix times, so a Ray worker's marks compare with its driver's start.
    """

    def __init__(self) -> None:
        self.marks: list[float] = []

    def start_epoch(self) -> None:
        if not self.marks:
            self.marks.append(time.time())

    def end_epoch(self) -> None:
        self.marks.append(time.time())

    @property
    def last_epoch_s(self) -> float:
        return self.marks[-1] - self.marks[-2]

    @property
    def loop_start(self) -> float | None:
        return self.marks[0] if self.marks else None

    @property
    def epoch_seconds(self) -> list[float]:
        return [b - a for a, b in itertools.pairwise(self.marks)]


EpochCallback = Callable[[int, Distiller, list[dict[str, Any]]], None]


class Training:
    """One executor's call of the one loop (:func:`intraq_core.distill.train_epochs`), the same for every executor.

    Owns what every executor shares around the loop: the :class:`~intraq_core.distill.Distiller`
    (``distill.batch_size`` images per step over all workers, the steps per epoch of the training
    images whatever the number of workers), the data-free selector (:func:`make_selector`), resuming
    from a checkpoint of this training (:meth:`resume`), the checkpoint bytes (:meth:`state_bytes`),
    the epoch clock, and the report an outcome is made of (:meth:`report`). The executor supplies
    only what differs: ``model`` (the student, or its data-parallel wrapper), where the batches and
    the held-out images come from, ``reduce`` (the sum over workers of the held-out scores and epoch
    statistics), its seed, and where the checkpoints go (the ``checkpoint`` callback of :meth:`run`).
    """

    def __init__(
        self,
        ctx: RunContext,
        teacher: torch.nn.Module,
        model: torch.nn.Module,
        *,
        identity: dict[str, Any],
        holdout: torch.Tensor | Callable[[], Any] | None,
        device: torch.device,
        seed: int,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        d = ctx.cfg.distill
        self.identity, self.reduce, self.device = identity, reduce, device
        self.selector = make_selector(ctx, teacher, holdout, device=device, reduce=reduce)
        self.steps_per_epoch = steps_per_epoch(int(identity["num_train"]), d)
        self.distiller = Distiller(model, teacher, d, steps_per_epoch=self.steps_per_epoch, seed=seed, device=device)
        self.first_epoch = 0
        self.history: list[dict[str, Any]] = []
        #: The executor bookkeeping of the checkpoint resumed from (empty when starting afresh).
        self.extra: dict[str, Any] = {}
        self.clock = EpochClock()

    def resume(self, state: dict[str, Any] | None) -> bool:
        """Continue after the checkpoint ``state`` (None: start afresh); whether there was one."""
        if state is None:
            return False
        self.first_epoch, self.history = self.distiller.resume(state)
        self.extra = dict(state.get("extra") or {})
        if self.selector is not None and state.get("selector") is not None:
            self.selector.load_state(state["selector"])
        return True

    def state_bytes(self, epoch: int, rows: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> bytes:
        """The checkpoint after ``epoch`` (:func:`~pipeline.stages.train_state.train_state_bytes`)."""
        return train_state_bytes(self.identity, epoch, rows, self.distiller, extra=extra, selector=self.selector)

    def run(
        self,
        batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]],
        *,
        before_epoch: Callable[[int], None] | None = None,
        checkpoint: EpochCallback | None = None,
        on_epoch: EpochCallback | None = None,
        tags: dict[str, Any] | None = None,
        progress: bool = False,
    ) -> list[dict[str, Any]]:
        """The remaining epochs; the whole history. ``before_epoch``, ``checkpoint`` (at the
        ``distill.checkpoint_every`` cadence) and ``on_epoch`` are the executor's (timed here)."""

        def start(epoch: int) -> None:
            if before_epoch is not None:
                before_epoch(epoch)
            self.clock.start_epoch()

        def end(epoch: int, distiller: Distiller, rows: list[dict[str, Any]]) -> None:
            self.clock.end_epoch()
            if on_epoch is not None:
                on_epoch(epoch, distiller, rows)

        self.history = train_epochs(
            self.distiller,
            batches,
            first_epoch=self.first_epoch,
            history=self.history,
            reduce=self.reduce,
            selector=self.selector,
            before_epoch=start,
            checkpoint=checkpoint,
            on_epoch=end,
            tags=tags,
            progress=progress,
        ).epochs
        return self.history

    def report(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """What the training call did, in plain types (a Ray worker reports it to the driver):
        :meth:`TrainOutcome.from_report` makes the outcome of it. Called at the end of the last epoch
        (the selector has chosen by then) or after :meth:`run`."""
        selection = self.selector.selection if self.selector is not None else None
        agree0, agree1 = selection_outcome(selection)
        return {
            "history": list(rows),
            "agreement_calibrated": agree0,
            "agreement_final": agree1,
            "selection": selection.summary() if selection is not None else None,
            "steps_per_epoch": self.steps_per_epoch,
            "optimizer_steps": self.distiller.step_count,
            "loop_start_unix": self.clock.loop_start,
            "epoch_seconds": self.clock.epoch_seconds,
            "device": str(self.device),
        }


def train_local(
    ctx: RunContext,
    manifest: Manifest,
    *,
    progress: bool = True,
    on_epoch: EpochCallback | None = None,
) -> TrainOutcome:
    """Calibrate and distil in this process; writes the calibrated and the kept student.

    Checkpoints ``train_state.pt`` at the ``distill.checkpoint_every`` cadence and resumes from it
    (see the module docstring). ``on_epoch(epoch, distiller, rows)`` runs after every epoch (Tune
    trials report from it). The selector's probe set is ``distill.probe``'s images.
    """
    started = time.time()
    images, labels, indices = load_dataset(ctx, manifest)
    hold = split_mask(indices, ctx.cfg.seed, ctx.cfg.distill.holdout_fraction)
    train_x, train_y = images[~hold], labels[~hold]
    teacher = ctx.teacher().to(ctx.device)

    t0 = time.perf_counter()
    student = prepare_student(ctx, teacher, train_x)
    sensitivity = write_calibrated(ctx, student)
    t1 = time.perf_counter()
    num_train = int(train_x.shape[0])
    training = Training(
        ctx,
        teacher,
        student,
        identity=train_identity(ctx, manifest, num_train),
        holdout=images[hold] if hold.any() else None,
        device=ctx.device,
        seed=ctx.cfg.seed,
    )
    training.resume(load_train_state(ctx, training.identity))

    with CheckpointWriter(ctx.storage) as writer:

        def before_epoch(epoch: int) -> None:
            if KILL_AT_ENV in os.environ:  # test hook: the previous checkpoint is on disk first
                writer.flush()
            kill_point("train", epoch)

        def checkpoint(epoch: int, _: Distiller, rows: list[dict[str, Any]]) -> None:
            writer.submit(TRAIN_STATE_PATH, training.state_bytes(epoch, rows))

        batches = EpochBatches(
            train_x, train_y, ctx.cfg.distill.batch_size, steps=training.steps_per_epoch, seed=ctx.cfg.seed
        )
        history = training.run(
            batches, before_epoch=before_epoch, checkpoint=checkpoint, on_epoch=on_epoch, progress=progress
        )
    t2 = time.perf_counter()
    write_outputs(ctx, student, history)
    return TrainOutcome.from_report(
        ctx.cfg,
        training.report(history),
        num_train=num_train,
        num_holdout=int(hold.sum()),
        seconds_calibrate=t1 - t0,
        seconds_distill=t2 - t1,
        started=started,
        sensitivity=sensitivity,
    )
