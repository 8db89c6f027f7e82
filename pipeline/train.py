"""Training stage: synthetic shards → calibrated, distilled student checkpoint.

Steps: quantize a copy of the teacher, calibrate its activation ranges on synthetic images
(then freeze them), optionally re-estimate BN statistics, distil, and write the student.
A held-out split of the synthetic images (chosen by image index, so it is the same for
every executor) measures teacher–student agreement before and after distillation: the
data-free signal used to compare recipes without touching the test set.

Two executors: ``local`` (this module, in-memory) and ``ray`` (:mod:`pipeline.ray_train`,
Ray Train over a Ray Data stream of the shards).

Both resume after a crash. The local executor writes ``train_state.pt`` after every epoch
(:class:`~intraq_core.distill.Distiller` state: student, optimizer, step, augmentation RNG;
plus the epoch and history; tensors and plain types only, read with ``weights_only=True``)
and a re-run continues after the last finished epoch. The batch order of an epoch is seeded by
the epoch, and the augmentation RNG is part of the state, so a resumed run trains exactly as an
uninterrupted one. The checkpoint records the config hash and the dataset's fingerprint and is
ignored (training restarts) when either differs.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from intraq_core.api import CalibrationInputs, run_calibration
from intraq_core.api import calibration_positions as calibration_positions_of
from intraq_core.distill import Distiller, augment_batch, distill, reestimate_bn
from intraq_core.errors import CheckpointError
from intraq_core.evaluate import agreement
from intraq_core.models.checkpoint import safe_load
from intraq_core.quant import act_quantizers
from intraq_core.quant import calibrate as calibrate_ranges
from intraq_core.seeding import PURPOSE_CALIBRATION, derive_seed
from intraq_core.selection import Selector
from intraq_core.student import build_student, student_checkpoint_bytes
from pipeline.context import RunContext, kill_point
from pipeline.generate import dataset_storage
from pipeline.shards import Manifest, read_shard

log = logging.getLogger(__name__)

STUDENT_PATH = "student.pt"
CALIBRATED_PATH = "student_calibrated.pt"
TRAIN_HISTORY_PATH = "train_history.json"
#: The local executor's resume point: the state after the last finished epoch.
TRAIN_STATE_PATH = "train_state.pt"
TRAIN_STATE_FORMAT = "intraq-train-state/1"
HOLDOUT_PURPOSE = 6


def holdout_mask(indices: np.ndarray, seed: int, fraction: float) -> np.ndarray:
    """Which images (by global index) are held out of training: a seeded hash of the index."""
    if fraction <= 0:
        return np.zeros(len(indices), dtype=bool)
    threshold = int(fraction * 10_000)
    return np.array([derive_seed(seed, HOLDOUT_PURPOSE, int(i)) % 10_000 < threshold for i in indices], dtype=bool)


@dataclass
class TrainOutcome:
    """Summary of the training stage (written into metrics.json)."""

    num_train: int
    num_holdout: int
    agreement_calibrated: dict[str, float] | None
    agreement_final: dict[str, float] | None
    history: list[dict[str, float]] = field(default_factory=list)
    seconds_calibrate: float = 0.0
    seconds_distill: float = 0.0
    selection: dict[str, Any] | None = None

    def summary(self) -> dict[str, Any]:
        out = {
            "num_train_images": self.num_train,
            "num_holdout_images": self.num_holdout,
            "holdout_agreement_calibrated": self.agreement_calibrated,
            "holdout_agreement_final": self.agreement_final,
            "final_epoch": self.history[-1] if self.history else None,
        }
        if self.selection is not None:
            out["selected_epoch"] = self.selection["selected_epoch"]
            out["selection_rule"] = self.selection["selection_rule"]
            out["kept_final"] = self.selection["kept_final"]
            out["evaluations"] = self.selection["evaluations"]
        return out


def load_dataset(ctx: RunContext, manifest: Manifest) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """All shards of the manifest in memory: (images, labels, global indices)."""
    storage = dataset_storage(ctx)
    images, labels, indices = [], [], []
    for entry in manifest.shards:
        shard = read_shard(storage, entry.path)
        images.append(shard.images)
        labels.append(shard.labels)
        indices.append(shard.indices)
    return (
        torch.from_numpy(np.concatenate(images)),
        torch.from_numpy(np.concatenate(labels)),
        np.concatenate(indices),
    )


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
) -> torch.nn.Module:
    """:func:`prepare_student` on given calibration batches and reconstruction images
    (executors that read only those rows).

    With ``distill.bn: reestimate`` the BN statistics are re-estimated on the batches first (the
    ranges calibrated before and after); then the quantization parameters are set by
    ``quant.method`` (:func:`intraq_core.api.run_calibration`). ``squant`` needs no batches: it
    rounds the weights and sets the activation ranges from the BN statistics.
    """
    device = ctx.device
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


def annotate_history(history: list[dict[str, float]], evaluations: list[dict[str, Any]]) -> None:
    """Add the selector's data-free scores to the history rows of the epochs it evaluated."""
    by_epoch = {e["epoch"]: e for e in evaluations if e["epoch"] is not None}
    for row in history:
        e = by_epoch.get(int(row["epoch"]))
        if e is None:
            continue
        row["watch_kl"] = e["kl"]
        row["watch_agreement"] = e["agreement"]
        for name in ("holdout", "probe"):
            if name in e:
                row[f"{name}_agreement"] = e[name]["agreement"]
                row[f"{name}_kl"] = e[name]["kl"]


def quantize_only(ctx: RunContext) -> TrainOutcome:
    """The student of a run that needs no images (SQuant with ``distill.epochs: 0``).

    Writes it as both the calibrated and the final student (there is no distillation, no dataset
    and so no held-out agreement).
    """
    teacher = ctx.teacher().to(ctx.device)
    t0 = time.perf_counter()
    student = calibrate_student(ctx, teacher, [])
    seconds = time.perf_counter() - t0
    for path, stage in ((CALIBRATED_PATH, "calibrated"), (STUDENT_PATH, "final")):
        ctx.storage.write_bytes_atomic(
            path, student_checkpoint_bytes(student, ctx.model_cfg, ctx.cfg.quant, {"stage": stage})
        )
    ctx.storage.write_bytes_atomic(TRAIN_HISTORY_PATH, b"[]")
    return TrainOutcome(0, 0, None, None, [], seconds, 0.0)


def dataset_fingerprint(manifest: Manifest) -> str:
    """A short hash of the exact shard files of a manifest (their sha256, in shard order)."""
    h = hashlib.sha256()
    for entry in sorted(manifest.shards, key=lambda e: e.index):
        h.update(f"{entry.index}:{entry.sha256}\n".encode())
    return h.hexdigest()[:16]


def train_state_bytes(
    identity: dict[str, Any],
    epoch: int,
    history: list[dict[str, float]],
    distiller: Distiller,
    extra: dict[str, Any] | None = None,
) -> bytes:
    """The local executor's checkpoint (tensors and plain types only: weights-only loadable)."""
    payload = {
        "format": TRAIN_STATE_FORMAT,
        **identity,
        "epoch": int(epoch),
        "history": [dict(row) for row in history],
        "distiller": distiller.state_dict(),
        **(extra or {}),
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    return buf.getvalue()


def load_train_state(ctx: RunContext, identity: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint at ``train_state.pt`` if it belongs to this training (``identity``), else None.

    Read with ``torch.load(weights_only=True)``; an unreadable or foreign checkpoint is ignored
    with a warning (training then starts from the calibrated student).
    """
    try:
        raw = ctx.storage.read_bytes(TRAIN_STATE_PATH)
    except FileNotFoundError:
        return None
    where = ctx.storage.join(TRAIN_STATE_PATH)
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
    differs = [k for k, v in identity.items() if state.get(k) != v]
    if differs:
        log.warning("ignoring training checkpoint %s of another training (%s differ)", where, ", ".join(differs))
        return None
    log.info("resuming distillation after epoch %d from %s", int(state["epoch"]), where)
    return state


def train_local(
    ctx: RunContext, manifest: Manifest, *, progress: bool = True, probe: torch.Tensor | None = None
) -> TrainOutcome:
    """Calibrate and distil in this process; writes the calibrated and final student.

    Writes ``train_state.pt`` after every epoch and resumes from it (see the module docstring).
    """
    images, labels, indices = load_dataset(ctx, manifest)
    hold = holdout_mask(indices, ctx.cfg.seed, ctx.cfg.distill.holdout_fraction)
    if hold.all():
        hold[:] = False
    train_x, train_y = images[~hold], labels[~hold]
    hold_x = images[hold]
    device = ctx.device
    teacher = ctx.teacher().to(device)

    t0 = time.perf_counter()
    student = prepare_student(ctx, teacher, train_x)
    agree0 = agreement(student, teacher, hold_x, device=device) if hold.any() else None
    dcfg = ctx.cfg.distill
    selector = None
    if hold.any() or probe is not None:
        selector = Selector(
            teacher,
            hold_x if hold.any() else None,
            probe,
            every=dcfg.evaluation_interval(),
            device=device,
            augment=lambda x, gen: augment_batch(x, dcfg, gen),
            views=dcfg.watch_views,
            seed=derive_seed(ctx.cfg.seed, HOLDOUT_PURPOSE, 1),
        )
        selector.start(student)
    ctx.storage.write_bytes_atomic(
        CALIBRATED_PATH,
        student_checkpoint_bytes(student, ctx.model_cfg, ctx.cfg.quant, {"stage": "calibrated"}),
    )
    t1 = time.perf_counter()
    identity = {
        "config_hash": ctx.cfg.config_hash(),
        "dataset": dataset_fingerprint(manifest),
        "num_train": int(train_x.shape[0]),
    }

    def after_epoch(epoch: int, distiller: Distiller, rows: list[dict[str, float]]) -> None:
        if selector is not None:
            selector.on_epoch(epoch, distiller.student, last_epoch=dcfg.epochs - 1)
        extra = {"selector": selector.state()} if selector is not None else {}
        ctx.storage.write_bytes_atomic(TRAIN_STATE_PATH, train_state_bytes(identity, epoch, rows, distiller, extra))

    start = load_train_state(ctx, identity)
    if start is not None and selector is not None and "selector" in start:
        selector.load_state(start["selector"])
    history = distill(
        student,
        teacher,
        train_x,
        train_y,
        dcfg,
        seed=ctx.cfg.seed,
        device=device,
        progress=progress,
        start=start,
        before_epoch=lambda epoch: kill_point("train", epoch),  # test hook
        on_epoch=after_epoch,
    ).epochs
    selection = None
    if selector is not None:
        final_epoch = dcfg.epochs - 1 if dcfg.epochs > 0 else None
        if dcfg.select == "best":
            selection = selector.finish(student, final_epoch)
        else:
            selection = selector.finish(copy.deepcopy(student), final_epoch)
            selection.selected_epoch, selection.kept_final = final_epoch, True
        if not selection.kept_final:
            log.warning("%s", selection.message)
    t2 = time.perf_counter()
    agree1 = agreement(student, teacher, hold_x, device=device) if hold.any() else None
    ctx.storage.write_bytes_atomic(
        STUDENT_PATH, student_checkpoint_bytes(student, ctx.model_cfg, ctx.cfg.quant, {"stage": "final"})
    )
    if selection is not None:
        annotate_history(history, selection.evaluations)
    ctx.storage.write_bytes_atomic(TRAIN_HISTORY_PATH, json.dumps(history, indent=1).encode())
    return TrainOutcome(
        int((~hold).sum()),
        int(hold.sum()),
        agree0,
        agree1,
        history,
        t1 - t0,
        t2 - t1,
        selection.summary() if selection is not None else None,
    )
