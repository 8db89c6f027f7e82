"""Training stage: synthetic shards → calibrated, distilled student checkpoint.

Steps: quantize a copy of the teacher, set its quantization parameters on synthetic images
(``quant.method``: min/max or Lp ranges, block reconstruction, SQuant), optionally re-estimate
BN statistics, distil, and write the student. A held-out split of the synthetic images (chosen
by image index, so it is the same for every executor) is what the data-free selector
(:mod:`intraq_core.selection`) scores the student on before distillation, every
``distill.eval_every`` epochs and at the end; the run keeps the best-scoring student
(``distill.select: best``) and says so in ``metrics.json`` (``selected_epoch``,
``selection_rule``). The test set is never involved.

Two executors run the same loop (:func:`intraq_core.distill.train_epochs`): ``local`` (this
module, in-memory, :func:`train_local`) and ``ray`` (:mod:`pipeline.ray.train`, Ray Train
workers over the shards). What is shared lives here:

* **The recipe does not depend on the number of workers.** ``distill.batch_size`` is the
  global batch; N workers take ``batch_size / N`` images each per step, and the steps per epoch
  (:func:`intraq_core.distill.steps_per_epoch` of the training images) and the learning-rate
  schedule are the same for every N. :class:`TrainOutcome` records ``train_workers``,
  ``global_batch_size`` and ``optimizer_steps`` (they go into ``metrics.json``).
* **One checkpoint format** (:func:`train_state_bytes` / :func:`parse_train_state`): the
  :class:`~intraq_core.distill.Distiller` state (student with bare, DDP-free keys; optimizer;
  step; augmentation RNG), the epoch and the history, plus the identity of the training (config
  hash, dataset fingerprint, number of training images). Tensors and plain types only, read
  with ``torch.load(weights_only=True)``. A checkpoint of another training is ignored (with a
  warning) and training restarts. The local executor keeps it at ``train_state.pt``; Ray Train
  keeps the same file in each of its checkpoints.
* **Checkpoint cadence.** Every ``distill.checkpoint_every`` epochs (default: a tenth of the
  run) and at the last epoch, written in the background (:class:`CheckpointWriter`) while the
  next epoch trains. The batch order of an epoch is seeded by the epoch and the augmentation
  RNG is part of the state, so a run resumed by the local executor trains exactly (bit for
  bit) as an uninterrupted one.
* **One set of outputs**: :func:`write_outputs` (``student.pt``, ``train_history.json``).
* **The selector's state** (its scores and the best student so far) is part of the
  checkpoint, so a resumed run chooses exactly as an uninterrupted one.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import itertools
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from intraq_core.api import CalibrationInputs, run_calibration
from intraq_core.api import calibration_positions as calibration_positions_of
from intraq_core.distill import Distiller, distill, distillation_selector, reestimate_bn, steps_per_epoch
from intraq_core.errors import CheckpointError
from intraq_core.models.checkpoint import safe_load
from intraq_core.quant import act_quantizers, calibrate_ranges
from intraq_core.seeding import PURPOSE_CALIBRATION, derive_seed
from intraq_core.selection import Selection, Selector
from intraq_core.student import build_student, student_checkpoint_bytes
from pipeline.config import RunConfig
from pipeline.context import KILL_AT_ENV, RunContext, dataset_storage, kill_point
from pipeline.errors import InputError
from pipeline.storage.shards import Manifest, read_shard
from pipeline.storage.store import Storage

log = logging.getLogger(__name__)

STUDENT_PATH = "student.pt"
CALIBRATED_PATH = "student_calibrated.pt"
TRAIN_HISTORY_PATH = "train_history.json"
#: The local executor's resume point (Ray Train's checkpoints hold a file of the same name).
TRAIN_STATE_PATH = "train_state.pt"
TRAIN_STATE_FORMAT = "intraq-train-state/1"
HOLDOUT_PURPOSE = 6


def holdout_mask(indices: np.ndarray, seed: int, fraction: float) -> np.ndarray:
    """Which images (by global index) are held out of training: a seeded hash of the index."""
    if fraction <= 0:
        return np.zeros(len(indices), dtype=bool)
    threshold = int(fraction * 10_000)
    return np.array([derive_seed(seed, HOLDOUT_PURPOSE, int(i)) % 10_000 < threshold for i in indices], dtype=bool)


def split_mask(indices: np.ndarray, seed: int, fraction: float) -> np.ndarray:
    """:func:`holdout_mask`, except that a dataset held out entirely is all trained on instead."""
    hold = holdout_mask(indices, seed, fraction)
    if hold.all():
        hold[:] = False
    return hold


def training_images(num_images: int, seed: int, fraction: float) -> int:
    """How many of a dataset's ``num_images`` images (indices 0..num_images-1) are trained on, the
    rest held out (:func:`split_mask`): known before any image exists."""
    return int((~split_mask(np.arange(num_images), seed, fraction)).sum())


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
        if self.selection is not None:
            out["selected_epoch"] = self.selection["selected_epoch"]
            out["selection_rule"] = self.selection["selection_rule"]
            out["kept_final"] = self.selection["kept_final"]
            out["evaluations"] = self.selection["evaluations"]
        return out


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
    storage = dataset_storage(ctx)
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


def calibration_positions(num_images: int, ctx: RunContext) -> list[torch.Tensor]:
    """Which training images (positions in the training order) each calibration batch uses.

    Split out of :func:`calibration_batches` so an executor that streams the data (Ray) can
    read just these images and still calibrate on exactly the images the local executor uses.
    """
    q, d = ctx.cfg.quant, ctx.cfg.distill
    return calibration_positions_of(num_images, q.calibration_batches, d.batch_size, ctx.cfg.seed)


def calibration_batches(images: torch.Tensor, ctx: RunContext) -> list[torch.Tensor]:
    """Seeded random batches of synthetic images for activation-range calibration."""
    return [images[idx] for idx in calibration_positions(images.shape[0], ctx)]


def reconstruction_positions(num_images: int, ctx: RunContext) -> torch.Tensor | None:
    """Which training images (positions) block reconstruction uses; None without reconstruction."""
    q = ctx.cfg.quant
    if q.method != "reconstruct":
        return None
    n = num_images if q.reconstruct.num_images is None else min(q.reconstruct.num_images, num_images)
    gen = torch.Generator().manual_seed(derive_seed(ctx.cfg.seed, PURPOSE_CALIBRATION, 1))
    return torch.randperm(num_images, generator=gen)[:n]


def prepare_student(ctx: RunContext, teacher: torch.nn.Module, train_images: torch.Tensor) -> torch.nn.Module:
    """Quantize, calibrate ranges (then freeze), optionally re-estimate BN (then re-calibrate)
    and, with ``quant.method: reconstruct``, run block reconstruction on the training images."""
    positions = reconstruction_positions(train_images.shape[0], ctx)
    images = train_images[positions] if positions is not None else None
    return calibrate_student(ctx, teacher, calibration_batches(train_images, ctx), images)


def calibrate_student(
    ctx: RunContext,
    teacher: torch.nn.Module,
    batches: list[torch.Tensor],
    images: torch.Tensor | None = None,
    device: torch.device | None = None,
) -> torch.nn.Module:
    """:func:`prepare_student` on given calibration batches and reconstruction images
    (executors that read only those rows), on ``device`` (default: the run's).

    With ``distill.bn: reestimate`` the BN statistics are re-estimated on the batches first (the
    ranges calibrated before and after); then the quantization parameters are set by
    ``quant.method`` (:func:`intraq_core.api.run_calibration`). ``squant`` needs no batches: it
    rounds the weights and sets the activation ranges from the BN statistics.
    """
    device = ctx.device if device is None else device
    teacher = teacher.to(device)
    student = build_student(teacher, ctx.cfg.quant).to(device)
    batches = [b.to(device) for b in batches]
    if ctx.cfg.distill.bn == "reestimate" and batches:
        calibrate_ranges(student, batches)
        reestimate_bn(student, iter(batches), device=device)
        for quantizer in act_quantizers(student).values():
            quantizer.reset()
    inputs = CalibrationInputs(
        batches, teacher, images, ctx.cfg.seed, image_shape=ctx.image_shape, normalization=ctx.normalization
    )
    run_calibration(student, ctx.cfg.quant, inputs)
    return student


def probe_storage(ctx: RunContext) -> Storage | None:
    """The dataset folder of ``distill.probe`` (None when no probe set is named)."""
    location = ctx.cfg.distill.probe
    if location is None:
        return None
    return Storage.from_config(ctx.cfg.storage.model_copy(update={"url": location})).child("data")


def load_probe(ctx: RunContext) -> torch.Tensor | None:
    """The probe images of ``distill.probe`` (every shard of that location's dataset), or None."""
    storage = probe_storage(ctx)
    if storage is None:
        return None
    location = ctx.cfg.distill.probe
    if not Manifest.exists(storage):
        raise FileNotFoundError(f"distill.probe={location}: no synthetic dataset there (data/manifest.json missing)")
    manifest = Manifest.load(storage)
    images = [read_shard(storage, entry.path).images for entry in manifest.shards]
    if not images:
        raise ValueError(f"distill.probe={location}: the dataset there has no shard")
    return torch.from_numpy(np.concatenate(images))


def make_selector(
    ctx: RunContext,
    teacher: torch.nn.Module,
    holdout: torch.Tensor | Callable[[], Any] | None,
    *,
    device: torch.device | str | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Selector | None:
    """The data-free selector of a training (None when there is nothing to score on).

    The same for every executor (:func:`intraq_core.distill.distillation_selector`): held-out
    images and their augmented views, the probe set named by ``distill.probe``; ``reduce`` sums
    the held-out counts over data-parallel workers.
    """
    probe = load_probe(ctx)
    if holdout is None and probe is None:
        return None
    return distillation_selector(
        teacher,
        holdout,
        ctx.cfg.distill,
        probe=probe,
        device=ctx.device if device is None else device,
        seed=derive_seed(ctx.cfg.seed, HOLDOUT_PURPOSE, 1),
        reduce=reduce,
    )


def quantize_only(ctx: RunContext) -> TrainOutcome:
    """The student of a run that needs no images (SQuant with ``distill.epochs: 0``).

    Writes it as both the calibrated and the final student (there is no distillation, no dataset
    and so no held-out agreement).
    """
    teacher = ctx.teacher().to(ctx.device)
    t0 = time.perf_counter()
    student = calibrate_student(ctx, teacher, [])
    seconds = time.perf_counter() - t0
    write_calibrated(ctx, student)
    write_outputs(ctx, student, [])
    return TrainOutcome(0, 0, None, None, [], seconds, 0.0)


def selection_outcome(selection: Selection | None) -> tuple[dict[str, float] | None, dict[str, float] | None]:
    """Held-out (agreement, KL) of the starting and of the kept student, from the selector's scores."""
    if selection is None or not selection.evaluations or "holdout" not in selection.evaluations[0]:
        return None, None
    kept = next(e for e in selection.evaluations if e["epoch"] == selection.selected_epoch)
    return dict(selection.evaluations[0]["holdout"]), dict(kept["holdout"])


def dataset_fingerprint(manifest: Manifest) -> str:
    """A short hash of the exact shard files of a manifest (their sha256, in shard order)."""
    h = hashlib.sha256()
    for entry in sorted(manifest.shards, key=lambda e: e.index):
        h.update(f"{entry.index}:{entry.sha256}\n".encode())
    return h.hexdigest()[:16]


def train_identity(ctx: RunContext, manifest: Manifest, num_train: int) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: config, dataset, training images (not the workers)."""
    return {"config_hash": ctx.cfg.config_hash(), "dataset": dataset_fingerprint(manifest), "num_train": num_train}


def train_state_bytes(
    identity: dict[str, Any],
    epoch: int,
    history: list[dict[str, Any]],
    distiller: Distiller,
    extra: dict[str, Any] | None = None,
    selector: Selector | None = None,
) -> bytes:
    """The checkpoint of both executors (tensors and plain types only: weights-only loadable).

    ``extra`` holds executor bookkeeping (plain types), e.g. Ray's attempt counter; ``selector``
    its scores and best state so far.
    """
    payload = {
        "format": TRAIN_STATE_FORMAT,
        **identity,
        "epoch": int(epoch),
        "history": [dict(row) for row in history],
        "distiller": distiller.state_dict(),
        "extra": dict(extra or {}),
        "selector": selector.state() if selector is not None else None,
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    return buf.getvalue()


def parse_train_state(raw: bytes, identity: dict[str, Any] | None, where: str) -> dict[str, Any] | None:
    """A checkpoint from :func:`train_state_bytes` if it belongs to this training, else None.

    Read with ``torch.load(weights_only=True)``; an unreadable or foreign checkpoint is ignored
    with a warning naming ``where`` (training then starts from the calibrated student).
    ``identity`` None accepts any training's checkpoint.
    """
    try:
        state = safe_load(raw, what=where)
    except CheckpointError as exc:
        log.warning(
            "ignoring unreadable training checkpoint %s: %s", where, str(exc).splitlines()[0] if str(exc) else exc
        )
        return None
    if not isinstance(state, dict) or state.get("format") != TRAIN_STATE_FORMAT:
        log.warning("ignoring %s: not an intraq training checkpoint", where)
        return None
    differs = [k for k, v in (identity or {}).items() if state.get(k) != v]
    if differs:
        log.warning("ignoring training checkpoint %s of another training (%s differ)", where, ", ".join(differs))
        return None
    log.info("resuming distillation after epoch %d from %s", int(state["epoch"]), where)
    return state


def load_train_state(ctx: RunContext, identity: dict[str, Any]) -> dict[str, Any] | None:
    """The local executor's checkpoint at ``train_state.pt``, if it belongs to this training."""
    try:
        raw = ctx.storage.read_bytes(TRAIN_STATE_PATH)
    except FileNotFoundError:
        return None
    return parse_train_state(raw, identity, ctx.storage.join(TRAIN_STATE_PATH))


class CheckpointWriter:
    """Writes checkpoints in a background thread, one at a time, while training goes on.

    :meth:`submit` takes the bytes already serialized (a snapshot: training may change the
    tensors right after), waits for the previous write, and starts this one; :meth:`flush` waits
    for the last. A failed write is raised by the next :meth:`submit` or :meth:`flush`.
    """

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="intraq-checkpoint")
        self._pending: concurrent.futures.Future[None] | None = None

    def submit(self, rel: str, data: bytes) -> None:
        self.flush()
        self._pending = self._pool.submit(self.storage.write_bytes_atomic, rel, data)

    def flush(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._pool.shutdown(wait=True)

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
        else:  # failing already: wait for the write, but report the original error
            try:
                self.close()
            except Exception as write_error:
                log.warning("checkpoint write failed too: %s", write_error)


def write_outputs(ctx: RunContext, student: torch.nn.Module, history: list[dict[str, Any]]) -> None:
    """The training stage's results: ``student.pt`` (the kept student) and ``train_history.json``."""
    ctx.storage.write_bytes_atomic(
        STUDENT_PATH, student_checkpoint_bytes(student, ctx.model_cfg, ctx.cfg.quant, {"stage": "final"})
    )
    ctx.storage.write_bytes_atomic(TRAIN_HISTORY_PATH, json.dumps(history, indent=1).encode())


def write_calibrated(ctx: RunContext, student: torch.nn.Module) -> None:
    """``student_calibrated.pt``: the student after range calibration, before distillation."""
    ctx.storage.write_bytes_atomic(
        CALIBRATED_PATH, student_checkpoint_bytes(student, ctx.model_cfg, ctx.cfg.quant, {"stage": "calibrated"})
    )


class EpochClock:
    """Start-up and per-epoch wall times of one training call (for throughput, never in the history)."""

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.first_step: float | None = None
        self.marks: list[float] = []

    def start_epoch(self) -> None:
        now = time.perf_counter()
        if self.first_step is None:
            self.first_step = now
            self.marks.append(now)

    def end_epoch(self) -> None:
        self.marks.append(time.perf_counter())

    @property
    def startup_s(self) -> float:
        return (self.first_step if self.first_step is not None else time.perf_counter()) - self.t0

    @property
    def epoch_seconds(self) -> list[float]:
        return [b - a for a, b in itertools.pairwise(self.marks)]


def train_local(
    ctx: RunContext,
    manifest: Manifest,
    *,
    progress: bool = True,
    on_epoch: Callable[[int, Distiller, list[dict[str, Any]]], None] | None = None,
) -> TrainOutcome:
    """Calibrate and distil in this process; writes the calibrated and the kept student.

    Checkpoints ``train_state.pt`` at the ``distill.checkpoint_every`` cadence and resumes from it
    (see the module docstring). ``on_epoch(epoch, distiller, rows)`` runs after every epoch (Tune
    trials report from it). The selector's probe set is ``distill.probe``'s images.
    """
    t_start = time.perf_counter()
    images, labels, indices = load_dataset(ctx, manifest)
    hold = split_mask(indices, ctx.cfg.seed, ctx.cfg.distill.holdout_fraction)
    train_x, train_y = images[~hold], labels[~hold]
    hold_x = images[hold]
    device = ctx.device
    teacher = ctx.teacher().to(device)

    t0 = time.perf_counter()
    student = prepare_student(ctx, teacher, train_x)
    write_calibrated(ctx, student)
    t1 = time.perf_counter()
    num_train = int(train_x.shape[0])
    identity = train_identity(ctx, manifest, num_train)
    clock = EpochClock(t_start)
    selector = make_selector(ctx, teacher, hold_x if hold.any() else None)
    start = load_train_state(ctx, identity)
    if start is not None and selector is not None and start.get("selector") is not None:
        selector.load_state(start["selector"])

    with CheckpointWriter(ctx.storage) as writer:

        def before_epoch(epoch: int) -> None:
            if KILL_AT_ENV in os.environ:  # test hook: the previous checkpoint is on disk first
                writer.flush()
            kill_point("train", epoch)
            clock.start_epoch()

        def checkpoint(epoch: int, distiller: Distiller, rows: list[dict[str, Any]]) -> None:
            writer.submit(TRAIN_STATE_PATH, train_state_bytes(identity, epoch, rows, distiller, selector=selector))

        def after_epoch(epoch: int, distiller: Distiller, rows: list[dict[str, Any]]) -> None:
            clock.end_epoch()
            if on_epoch is not None:
                on_epoch(epoch, distiller, rows)

        result = distill(
            student,
            teacher,
            train_x,
            train_y,
            ctx.cfg.distill,
            seed=ctx.cfg.seed,
            device=device,
            progress=progress,
            start=start,
            selector=selector,
            before_epoch=before_epoch,
            checkpoint=checkpoint,
            on_epoch=after_epoch,
        )
    history = result.epochs
    t2 = time.perf_counter()
    if result.selection is not None and not result.selection.kept_final:
        log.info("%s", result.selection.message)  # the run's summary line says it on the terminal
    agree0, agree1 = selection_outcome(result.selection)
    write_outputs(ctx, student, history)
    spe = steps_per_epoch(num_train, ctx.cfg.distill)
    return TrainOutcome(
        num_train,
        int(hold.sum()),
        agree0,
        agree1,
        history,
        t1 - t0,
        t2 - t1,
        train_workers=1,
        global_batch_size=ctx.cfg.distill.batch_size,
        steps_per_epoch=spe,
        optimizer_steps=int(history[-1]["step"]) if history else 0,
        startup_s=clock.startup_s,
        epoch_seconds=clock.epoch_seconds,
        data="memory",
        device=str(device),
        selection=result.selection.summary() if result.selection is not None else None,
    )
