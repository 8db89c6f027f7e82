"""A Ray Train worker: the calibrated student, this worker's share of the data, and the one training driver.

Each of the ``ray.train_workers`` = N workers (gloo on CPU, NCCL on GPU) drives the same
:class:`pipeline.stages.train.Training` as the local executor, with ``distill.batch_size / N`` images
per step: the global batch, steps per epoch and learning-rate schedule do not depend on N. DDP
(``prepare_model``, N > 1) averages the gradients. Epoch statistics and the data-free selector's
held-out scores (on the held-out images of each worker's split) are summed over the workers
(:class:`Collective`), so every worker keeps the same best student. Checkpoints travel as Ray Train
checkpoints (one ``train_state.pt`` each, written by rank 0, uploaded asynchronously); a restarted
worker group resumes from ``ray.train.get_checkpoint()``. Rank 0 writes the final student and history,
and, when the driver shows progress, keeps the epoch bar (``ray.experimental.tqdm_ray``: drawn on the
driver's terminal) with the loss, the teacher agreement and the images per second of all workers.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from intraq_core.distill import Distiller
from intraq_core.quant import set_act_mode
from intraq_core.seeding import derive_seed
from intraq_core.student import build_student
from intraq_core.torchfile import safe_load
from pipeline.config import RunConfig
from pipeline.context import RunContext, limit_threads, state_dict_sha256
from pipeline.ray.teacher import received_teacher
from pipeline.ray.train_data import WorkerData
from pipeline.stages.train import CALIBRATED_PATH, Training, write_outputs
from pipeline.stages.train_state import TRAIN_STATE_PATH, parse_train_state
from pipeline.storage.location import StorageConfig
from pipeline.storage.store import Storage

#: Test hook: ``"<epoch>:<marker file>"`` makes a worker raise once at the start of that epoch
#: (the marker file records that it did), after the checkpoints reported so far are committed.
#: Read on the driver, passed in ``train_loop_config``.
FAIL_ONCE_ENV = "INTRAQ_TEST_FAIL_ONCE"
#: What the driver writes instead of ``student_calibrated.pt`` when its calibration fails: the
#: workers, started while it calibrated, stop waiting (:func:`wait_for_calibrated`).
CALIBRATION_FAILED_PATH = "student_calibrated.failed"
#: Seconds between two looks for the calibrated student: from the first, doubling up to the last.
CALIBRATED_POLL_S = (0.05, 1.0)
#: Seed purpose of the augmentation stream of ranks > 0 (rank 0 uses the run's seed, so one worker
#: trains exactly like the local executor).
PURPOSE_RANK = 101


class Collective:
    """Sums over the Train workers (gloo on CPU; NCCL, which reduces GPU tensors only, on GPU)."""

    def __init__(self, world: int, device: torch.device) -> None:
        self.world, self.device = world, device

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return t
        import torch.distributed as dist

        reduced = t.to(self.device)
        dist.all_reduce(reduced)
        return reduced.cpu()


def _record_metrics(cfg: RunConfig, rank: int, loss: float, samples_per_s: float) -> None:
    try:
        from pipeline.ray.metrics import DISTILL_LOSS, DISTILL_SAMPLES_PER_S
    except ImportError:  # metrics are optional
        return
    DISTILL_LOSS.set(loss, run=cfg.name, worker=str(rank))
    DISTILL_SAMPLES_PER_S.set(samples_per_s, run=cfg.name, worker=str(rank))


def worker_context(config: dict[str, Any]) -> RunContext:
    """A worker's run context, holding the teacher the driver shared (:mod:`pipeline.ray.teacher`) when it could."""
    import ray

    cfg = RunConfig.model_validate(config["run_config"])
    storage = Storage.from_config(StorageConfig.model_validate(config["storage"]))
    shared = config["teacher"]
    return RunContext(cfg, storage, received_teacher(ray.get(shared)) if shared is not None else None)


def worker_teacher(ctx: RunContext, config: dict[str, Any], rank: int) -> torch.nn.Module:
    """A worker's copy of the teacher: the driver's, as received (not rebuilt, not checked again), or,
    when the driver could not share it, one built here from the config and checked against the driver's checksum."""
    teacher = ctx.teacher()
    if ctx.given_teacher is None and state_dict_sha256(teacher) != config["teacher_sha256"]:
        raise RuntimeError(
            f"Train worker {rank} resolved a different teacher than the driver (sha256 "
            f"{config['teacher_sha256'][:12]}): check model.weights on every node"
        )
    return teacher


def wait_for_calibrated(storage: Storage) -> bytes:
    """``student_calibrated.pt`` once the driver has written it: the workers start while it calibrates.

    The driver removes the file of an earlier attempt before the workers start, and writes it
    atomically, so it is the fresh one once it exists; :data:`CALIBRATION_FAILED_PATH` says the
    calibration failed (raised here, so the workers stop).
    """
    delay, longest = CALIBRATED_POLL_S
    while True:
        if storage.exists(CALIBRATED_PATH):
            return storage.read_bytes(CALIBRATED_PATH)
        if storage.exists(CALIBRATION_FAILED_PATH):
            reason = storage.read_bytes(CALIBRATION_FAILED_PATH).decode(errors="replace")
            raise RuntimeError(f"the driver's calibration failed: {reason}")
        time.sleep(delay)
        delay = min(2 * delay, longest)


def train_loop(config: dict[str, Any]) -> None:
    """Per-worker: load the calibrated student (or resume), read the data, run the one training driver."""
    import ray.train
    import ray.train.torch as rt
    from ray.train import CheckpointUploadMode
    from ray.train.v2.api.report_config import CheckpointConsistencyMode

    ctx = worker_context(config)
    cfg, storage = ctx.cfg, ctx.storage
    limit_threads(max(1, math.floor(config["cpus_per_worker"])))
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = rt.get_device()
    # The read starts now, in the background.
    data = WorkerData(config, rank, world, device, cfg.distill.batch_size // world, ctx.dataset_storage)
    teacher = worker_teacher(ctx, config, rank).to(device)
    student = build_student(teacher, cfg.quant)
    calibrated = safe_load(wait_for_calibrated(storage), what=storage.join(CALIBRATED_PATH))
    student.load_state_dict(calibrated["state_dict"])
    set_act_mode(student, "frozen")
    student = student.to(device).eval()
    data.wait()

    # BN statistics and activation ranges are frozen buffers: synced once at wrap, never per forward.
    model = rt.prepare_model(student, parallel_strategy_kwargs={"forward_sync_buffers": False})
    training = Training(
        ctx,
        teacher,
        model,
        identity=config["identity"],
        # Scores the bare module (no DDP collective per forward) on every worker's held-out rows.
        holdout=data.holdout if int(config["num_holdout"]) > 0 else None,
        device=device,
        seed=cfg.seed if rank == 0 else derive_seed(cfg.seed, PURPOSE_RANK, rank),
        reduce=Collective(world, device),
    )
    state = None
    resumed = ray.train.get_checkpoint()
    if resumed is not None:
        with resumed.as_directory() as tmp:
            state = parse_train_state((Path(tmp) / TRAIN_STATE_PATH).read_bytes(), training.identity, resumed.path)
    if training.resume(state) and rank > 0:  # its own augmentation stream, not rank 0's saved one
        distiller = training.distiller
        distiller.generator.manual_seed(derive_seed(cfg.seed, PURPOSE_RANK, rank, distiller.step_count))
    attempt = int(training.extra.get("attempt", 0)) + 1
    fail_once = config.get("fail_once")
    pending: list[Any] = []

    def before_epoch(epoch: int) -> None:
        if fail_once and epoch == int(fail_once[0]) and not Path(fail_once[1]).exists():
            ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)
            Path(fail_once[1]).write_text(f"worker {rank} failed at epoch {epoch}\n")
            raise RuntimeError(f"{FAIL_ONCE_ENV}: simulated worker failure at epoch {epoch}")

    def checkpoint(epoch: int, _: Distiller, rows: list[dict[str, Any]]) -> None:
        folder = tempfile.mkdtemp(prefix="intraq-ckpt-")  # Ray deletes it once uploaded
        if rank == 0:
            raw = training.state_bytes(epoch, rows, extra={"attempt": attempt})
            (Path(folder) / TRAIN_STATE_PATH).write_bytes(raw)
        pending.append(ray.train.Checkpoint.from_directory(folder))

    bar = None
    if rank == 0 and config.get("progress"):
        from ray.experimental import tqdm_ray

        bar = tqdm_ray.tqdm(desc="distill (ray)", total=cfg.distill.epochs, unit="epoch", flush_interval_s=0)

    def on_epoch(epoch: int, _: Distiller, rows: list[dict[str, Any]]) -> None:
        seconds = training.clock.last_epoch_s
        row = rows[-1]
        rate = data.batch * data.steps / max(seconds, 1e-9)
        _record_metrics(cfg, rank, row["loss"], rate)
        if bar is not None:
            bar.n = epoch + 1
            agree = row.get("agreement", float("nan"))
            bar.set_description(f"distill (ray) loss {row['loss']:.3f} agree {agree:.3f} img/s {rate * world:.0f}")
        metrics: dict[str, Any] = {**row, "samples_per_s": rate * world, "seconds": seconds}
        if epoch == cfg.distill.epochs - 1:  # the selector has chosen by now
            metrics["summary"] = training.report(rows)
        ckpt = pending.pop() if pending else None
        mode = CheckpointUploadMode.ASYNC if ckpt is not None else CheckpointUploadMode.SYNC
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_upload_mode=mode)

    try:
        rows = training.run(
            data.batches(),
            before_epoch=before_epoch,
            checkpoint=checkpoint,
            on_epoch=on_epoch,
            tags={"attempt": attempt, "workers": world},
        )
    finally:
        if bar is not None:
            bar.close()
    if rank == 0:
        write_outputs(ctx, training.distiller.module, rows)
