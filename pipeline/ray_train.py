"""Training stage on Ray: a ``TorchTrainer`` (Train V2) distils over a Ray Data stream of the shards.

Same outputs as :func:`pipeline.train.train_local` (``student_calibrated.pt``, ``student.pt``,
``train_history.json``, a :class:`~pipeline.train.TrainOutcome`), split as follows:

* **Driver** (this process). Reads only the ``index`` column of every shard to compute the
  held-out split (:func:`pipeline.train.holdout_mask`, so the same images as the local
  executor), then only the images calibration needs and the held-out images. Calibrates the
  student's activation ranges (exactly the local executor's calibration batches), writes
  ``student_calibrated.pt`` and a copy under ``ray_train/calibrated/`` that the workers open as
  a ``ray.train.Checkpoint`` whose path travels in ``train_loop_config`` (``fit(
  resume_from_checkpoint=)`` is deprecated in Train V2).
* **Workers** (``cfg.ray.train_workers``, gloo on CPU, NCCL on GPU). Each streams its split
  of ``ray.data.read_parquet`` of the shards (training split only, never the whole dataset in
  one process), wraps the student in DDP (``prepare_model``) and drives the same
  :class:`~intraq_core.distill.Distiller` as the local loop: same loss, optimizer, schedule and
  augmentation; ``steps_per_epoch`` = training images / (batch size x workers), or
  ``distill.iterations_per_epoch``. Every epoch all workers report (global means of the step
  statistics) and rank 0 attaches a checkpoint (``Distiller`` state, epoch, history; tensors and
  plain types only, so ``torch.load(weights_only=True)`` reads it).
* **Resume.** A restarted worker group (``FailureConfig(max_failures)``) and a ``--resume``d
  run (same ``RunConfig(name, storage_path)`` under ``<run>/ray_train``) continue after the last
  reported epoch: ``ray.train.get_checkpoint()`` returns it.
* **After fit** the driver loads the last checkpoint, measures held-out agreement and writes
  the final student and history.

Progress: a driver-side tqdm bar of epochs, fed by a ``UserCallback`` (it runs in the Train
controller) through a zero-CPU ``ray.util.queue.Queue``. Workers record the
``intraq_distill_loss`` and ``intraq_distill_samples_per_s`` gauges (:mod:`pipeline.metrics`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from intraq_core.distill import Distiller
from intraq_core.evaluate import agreement
from intraq_core.models.checkpoint import safe_load
from intraq_core.quant import set_act_mode
from intraq_core.seeding import derive_seed
from intraq_core.student import build_student, student_checkpoint_bytes
from pipeline.config import RunConfig
from pipeline.context import RunContext, limit_threads
from pipeline.generate import dataset_storage
from pipeline.shards import Manifest, pyarrow_dataset_source, read_shard, shard_paths
from pipeline.storage import Storage, StorageConfig
from pipeline.train import (
    CALIBRATED_PATH,
    STUDENT_PATH,
    TRAIN_HISTORY_PATH,
    TrainOutcome,
    calibrate_student,
    calibration_positions,
    holdout_mask,
)
from pipeline.user_code import with_user_code

__all__ = [
    "FAIL_ONCE_ENV",
    "RAY_TRAIN_DIR",
    "STATE_FILE",
    "load_train_state",
    "resolve_use_gpu",
    "restore_train_state",
    "train_ray",
    "train_run_name",
    "train_state",
    "worker_config",
]

log = logging.getLogger(__name__)

#: Folder of the run location holding Ray Train's experiment(s) and the calibrated student.
RAY_TRAIN_DIR = "ray_train"
INIT_DIR = f"{RAY_TRAIN_DIR}/calibrated"
#: File inside each reported checkpoint.
STATE_FILE = "state.pt"
#: Test hook: ``"<epoch>:<marker file>"`` makes a worker raise once at the start of that epoch
#: (the marker file records that it did). Read on the driver, passed in ``train_loop_config``.
FAIL_ONCE_ENV = "INTRAQ_TEST_FAIL_ONCE"
#: CPUs of each Ray Data read/filter task (fractional so they fit beside the Train workers).
DATA_TASK_CPUS = 0.25
SHUFFLE_BUFFER_BATCHES = 4
# Seed purpose of the per-rank augmentation stream of ranks > 0 (rank 0 uses the run seed, so a
# 1-worker run augments exactly like the local executor) and of the local shuffle.
PURPOSE_RANK = 101
PURPOSE_SHUFFLE = 102


def train_run_name(cfg: RunConfig) -> str:
    """Ray Train run name: stable for a config, so ``--resume`` finds the same experiment."""
    return f"distill-{cfg.config_hash()[:12]}"


def resolve_use_gpu(cfg: RunConfig) -> bool:
    """Whether Train workers get a GPU: ``ray.use_gpu`` yes/no, or ``auto`` = the cluster has GPUs."""
    import ray

    if cfg.device == "cpu" or cfg.ray.use_gpu == "no":
        return False
    if cfg.ray.use_gpu == "yes" or cfg.device == "cuda":
        return True
    return float(ray.cluster_resources().get("GPU", 0.0)) > 0


def load_train_state(path: str | Path) -> dict[str, Any]:
    """A worker checkpoint's state (``state.pt``), loaded weights-only."""
    return safe_load(Path(path))


# -- driver ----------------------------------------------------------------------------------


def _shard_indices(storage: Storage, manifest: Manifest) -> list[np.ndarray]:
    """The global image indices of every shard (only the ``index`` column is read)."""
    fs, paths = pyarrow_dataset_source(storage, manifest)
    return [pq.read_table(p, columns=["index"], filesystem=fs).column("index").to_numpy() for p in paths]


def _read_rows(storage: Storage, manifest: Manifest, per_shard: list[np.ndarray], rows: np.ndarray) -> torch.Tensor:
    """Images of the given global row numbers (shard order), reading only shards that hold some."""
    shape = tuple(manifest.image_shape)
    out = np.empty((len(rows), *shape), dtype=np.float32)
    starts = np.cumsum([0, *[len(i) for i in per_shard]])
    for k, path in enumerate(shard_paths(manifest)):
        lo, hi = starts[k], starts[k + 1]
        where = np.flatnonzero((rows >= lo) & (rows < hi))
        if where.size:
            out[where] = read_shard(storage, path).images[rows[where] - lo]
    return torch.from_numpy(out)


def _check_capacity(cfg: RunConfig, workers: int, cpus: float) -> None:
    """Fail fast instead of hanging when Train workers would leave no CPU for Ray Data tasks."""
    import ray

    total = float(ray.cluster_resources().get("CPU", 0.0))
    left = total - workers * cpus
    if left >= DATA_TASK_CPUS:
        return
    msg = (
        f"{workers} Train worker(s) x {cpus:g} CPU leave {max(left, 0):g} of the cluster's {total:g} "
        f"CPUs for Ray Data's read tasks (need {DATA_TASK_CPUS:g}): training would hang; lower "
        "ray.cpus_per_train_worker (e.g. 0.5) or ray.train_workers, or raise ray.num_cpus"
    )
    if cfg.ray.address is None:
        raise ValueError(msg)
    log.warning("%s (ignored: the cluster may autoscale)", msg)


def _train_dataset(storage: Storage, manifest: Manifest, holdout: np.ndarray) -> Any:
    """The training split of the shards as a lazy Ray Dataset (image, label, index).

    The held-out images (global ``index`` values in ``holdout``, from
    :func:`pipeline.train.holdout_mask`) are dropped by a native Arrow filter, so no Python UDF
    (and no torch import) runs in the read tasks and held-out images never reach a worker.
    """
    import ray.data
    from ray.data.expressions import col

    fs, paths = pyarrow_dataset_source(storage, manifest)
    ds = ray.data.read_parquet(paths, filesystem=fs, num_cpus=DATA_TASK_CPUS).select_columns(
        ["image", "label", "index"]
    )
    if holdout.size:
        ds = ds.filter(expr=col("index").not_in([int(i) for i in holdout]), num_cpus=DATA_TASK_CPUS)
    ds.context.enable_progress_bars = False  # the driver's epoch bar is the progress display
    ds.context.print_on_execution_start = False
    return ds


def worker_config(cfg: RunConfig, storage: Storage) -> dict[str, Any]:
    """The config for workers, with local paths made absolute (Ray changes their working dir)."""
    data = cfg.to_dict()
    data["storage"]["url"] = storage.url
    weights = data["model"].get("weights")
    if weights and "://" not in weights and Path(weights).expanduser().exists():
        data["model"]["weights"] = str(Path(weights).expanduser().resolve())
    return data


def _fail_once_hook() -> tuple[int, str] | None:
    raw = os.environ.get(FAIL_ONCE_ENV)
    if not raw:
        return None
    epoch, _, marker = raw.partition(":")
    return int(epoch), marker


class _Progress:
    """Driver-side epoch bar fed by a Train ``UserCallback`` through a zero-CPU queue actor."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.enabled = enabled
        self.queue: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.total = total

    def callback(self) -> list[Any]:
        if not self.enabled:
            return []
        from ray.util.queue import Queue

        self.queue = Queue(actor_options={"num_cpus": 0})
        return [_make_report_callback(self.queue)]

    def __enter__(self) -> _Progress:
        if self.queue is not None:
            self._thread = threading.Thread(target=self._poll, name="intraq-train-progress", daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        from ray.util.queue import Empty
        from tqdm.auto import tqdm

        bar = tqdm(total=self.total, desc="distill (ray)", unit="epoch")
        try:
            while True:
                try:
                    row = self.queue.get(timeout=0.5)
                except Empty:
                    if self._stop.is_set():
                        return
                    continue
                except Exception:  # the queue actor is gone
                    return
                bar.n = min(int(row.get("epoch", 0)) + 1, self.total)
                bar.set_postfix(
                    loss=f"{row.get('loss', float('nan')):.3f}",
                    agree=f"{row.get('agreement', float('nan')):.3f}",
                    img_s=f"{row.get('samples_per_s', 0):.0f}",
                )
                bar.refresh()
        finally:
            bar.close()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.queue is not None:
            import contextlib

            with contextlib.suppress(Exception):
                self.queue.shutdown()


def _make_report_callback(queue: Any) -> Any:
    """A ``ray.train.UserCallback`` that forwards rank 0's per-epoch metrics to ``queue``."""
    from ray.train import UserCallback

    class ReportToQueue(UserCallback):
        def __init__(self, q: Any) -> None:
            self.q = q

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            if metrics:
                try:  # fire and forget: never block the controller's event loop on the driver
                    self.q.actor.put_nowait.remote(dict(metrics[0]))
                except Exception:  # progress must never fail training
                    log.debug("progress queue unavailable")

    return ReportToQueue(queue)


def train_ray(ctx: RunContext, manifest: Manifest, *, progress: bool = True) -> TrainOutcome:
    """Calibrate on the driver, distil with a Ray ``TorchTrainer``; writes the students and history."""
    import ray
    from ray.train import (
        Checkpoint,
        CheckpointConfig,
        FailureConfig,
        LoggingConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = ctx.cfg
    data = dataset_storage(ctx)
    if "memory" in (ctx.storage.kind, data.kind):
        raise ValueError(
            "memory:// storage lives in one process; the ray executor needs a local path, file:// or s3://"
        )
    if not ray.is_initialized():
        raise RuntimeError("train_ray needs a running Ray (pipeline.ray_session.start_ray)")
    workers, cpus = cfg.ray.train_workers, cfg.ray.cpus_per_train_worker
    use_gpu = resolve_use_gpu(cfg)
    _check_capacity(cfg, workers, cpus)

    per_shard = _shard_indices(data, manifest)
    indices = np.concatenate(per_shard) if per_shard else np.zeros(0, dtype=np.int64)
    hold = holdout_mask(indices, cfg.seed, cfg.distill.holdout_fraction)
    if hold.all():
        hold[:] = False
    train_rows, hold_rows = np.flatnonzero(~hold), np.flatnonzero(hold)
    if train_rows.size == 0:
        raise ValueError(f"{data.url} holds no training images")

    device = ctx.device
    teacher = ctx.teacher().to(device)
    t0 = time.perf_counter()
    positions = [p.numpy() for p in calibration_positions(len(train_rows), ctx)]
    needed = np.unique(np.concatenate(positions))
    needed_x = _read_rows(data, manifest, per_shard, train_rows[needed])
    batches = [needed_x[torch.from_numpy(np.searchsorted(needed, p))] for p in positions]
    student = calibrate_student(ctx, teacher, batches)
    del needed_x, batches
    hold_x = _read_rows(data, manifest, per_shard, hold_rows) if hold_rows.size else None
    agree0 = agreement(student, teacher, hold_x, device=device) if hold_x is not None else None
    calibrated = student_checkpoint_bytes(student, ctx.model_cfg, cfg.quant, {"stage": "calibrated"})
    ctx.storage.write_bytes_atomic(CALIBRATED_PATH, calibrated)
    ctx.storage.write_bytes_atomic(f"{INIT_DIR}/{CALIBRATED_PATH}", calibrated)
    t1 = time.perf_counter()

    num_train = int(train_rows.size)
    d = cfg.distill
    spe = d.iterations_per_epoch or max(1, num_train // (d.batch_size * workers))
    loop_config: dict[str, Any] = {
        "run_config": worker_config(cfg, ctx.storage),
        "storage": ctx.storage.config.model_copy(update={"url": ctx.storage.url}).model_dump(mode="json"),
        "init_checkpoint": INIT_DIR,
        "image_shape": list(manifest.image_shape),
        "num_train": num_train,
        "steps_per_epoch": spe,
        "cpus_per_worker": cpus,
        "teacher_sha256": ctx.teacher_sha256,
        "fail_once": _fail_once_hook(),
    }
    fs, _ = ctx.storage.pyarrow_filesystem()
    bar = _Progress(d.epochs, progress)
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus}),
        run_config=RunConfig(
            name=train_run_name(cfg),
            storage_path=ctx.storage.pyarrow_path(RAY_TRAIN_DIR),
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=bar.callback(),
            logging_config=LoggingConfig(log_level="WARNING"),
            worker_runtime_env=with_user_code(None, cfg.model, upload=True) or {},
        ),
        datasets={"train": _train_dataset(data, manifest, indices[hold_rows])},
    )
    with bar:
        result = trainer.fit()
    t2 = time.perf_counter()

    checkpoint: Checkpoint | None = result.checkpoint
    if checkpoint is None:
        raise RuntimeError(f"Ray Train run {result.path} finished without a checkpoint")
    with checkpoint.as_directory() as tmp:
        state = load_train_state(Path(tmp) / STATE_FILE)
    final = build_student(teacher, cfg.quant)
    final.load_state_dict(state["distiller"]["student"])
    set_act_mode(final, "frozen")
    final = final.to(device).eval()
    agree1 = agreement(final, teacher, hold_x, device=device) if hold_x is not None else None
    history: list[dict[str, float]] = list(state["history"])
    ctx.storage.write_bytes_atomic(
        STUDENT_PATH, student_checkpoint_bytes(final, ctx.model_cfg, cfg.quant, {"stage": "final"})
    )
    ctx.storage.write_bytes_atomic(TRAIN_HISTORY_PATH, json.dumps(history, indent=1).encode())
    return TrainOutcome(num_train, int(hold_rows.size), agree0, agree1, history, t1 - t0, t2 - t1)


# -- workers ---------------------------------------------------------------------------------


def _batches(
    shard: Any, steps: int, batch_size: int, shape: tuple[int, ...], seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Exactly ``steps`` batches from this worker's stream, starting new passes as needed.

    Every worker takes the same number of steps (DDP collectives would hang otherwise); the
    split is equal-sized (``streaming_split(equal=True)``), so passes stay in step across workers.
    """
    produced = passes = 0
    while produced < steps:
        got = 0
        for batch in shard.iter_torch_batches(
            batch_size=batch_size,
            drop_last=True,
            local_shuffle_buffer_size=batch_size * SHUFFLE_BUFFER_BATCHES,
            local_shuffle_seed=(seed + passes) % 2**32,
            dtypes={"image": torch.float32, "label": torch.int64, "index": torch.int64},
        ):
            yield batch["image"].reshape(-1, *shape), batch["label"]
            got += 1
            produced += 1
            if produced >= steps:
                return
        if got == 0:
            raise RuntimeError(f"this Train worker's data split yielded no batch of {batch_size} images")
        passes += 1


def _bare(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP wrapper (its state-dict keys have no ``module.`` prefix)."""
    return getattr(model, "module", model)


def train_state(distiller: Distiller, epoch: int, history: list[dict[str, Any]], attempt: int) -> dict[str, Any]:
    """A worker checkpoint: ``Distiller`` state (bare student keys), epoch, history, attempt.

    Only tensors and plain types (the RNG state is a uint8 tensor), so it loads with
    ``torch.load(weights_only=True)``; and the student's keys carry no DDP prefix, so any
    number of workers (or the driver) can load it.
    """
    state = distiller.state_dict()
    state["student"] = {k: v.detach().cpu().clone() for k, v in _bare(distiller.student).state_dict().items()}
    state["rng"] = distiller.generator.get_state().clone()
    state["step"] = int(distiller.step_count)
    return {"distiller": state, "epoch": int(epoch), "history": list(history), "attempt": int(attempt)}


def restore_train_state(distiller: Distiller, state: dict[str, Any]) -> None:
    """Load :func:`train_state` into a (possibly DDP-wrapped) ``Distiller``."""
    saved = state["distiller"]
    _bare(distiller.student).load_state_dict(saved["student"])
    distiller.optimizer.load_state_dict(saved["optimizer"])
    distiller.step_count = int(saved["step"])
    distiller.generator.set_state(saved["rng"])


def _record_metrics(cfg: RunConfig, rank: int, loss: float, samples_per_s: float) -> None:
    try:
        from pipeline.metrics import DISTILL_LOSS, DISTILL_SAMPLES_PER_S
    except ImportError:  # metrics are optional
        return
    DISTILL_LOSS.set(loss, run=cfg.name, worker=str(rank))
    DISTILL_SAMPLES_PER_S.set(samples_per_s, run=cfg.name, worker=str(rank))


def _train_loop(config: dict[str, Any]) -> None:
    """Per-worker loop: load (or resume) the student, distil ``steps_per_epoch`` steps per epoch."""
    import ray.train
    import ray.train.torch as rt
    import torch.distributed as dist

    cfg = RunConfig.model_validate(config["run_config"])
    storage = Storage.from_config(StorageConfig.model_validate(config["storage"]))
    ctx = RunContext(cfg, storage)
    limit_threads(max(1, math.floor(config["cpus_per_worker"])))
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = rt.get_device()
    if ctx.teacher_sha256 != config["teacher_sha256"]:
        raise RuntimeError(
            f"Train worker {rank} resolved a different teacher (sha256 {ctx.teacher_sha256[:12]}, "
            f"driver {config['teacher_sha256'][:12]}): check model.weights on every node"
        )
    teacher = ctx.teacher().to(device)
    student = build_student(teacher, cfg.quant)

    state: dict[str, Any] | None = None
    resumed = ray.train.get_checkpoint()
    if resumed is not None:
        with resumed.as_directory() as tmp:
            state = load_train_state(Path(tmp) / STATE_FILE)
        student.load_state_dict(state["distiller"]["student"])
    else:
        fs, _ = storage.pyarrow_filesystem()
        init = ray.train.Checkpoint(path=storage.pyarrow_path(config["init_checkpoint"]), filesystem=fs)
        with init.as_directory() as tmp:
            payload = safe_load(Path(tmp) / CALIBRATED_PATH)
        student.load_state_dict(payload["state_dict"])
    set_act_mode(student, "frozen")
    model = rt.prepare_model(student)

    d = cfg.distill
    spe = int(config["steps_per_epoch"])
    seed = cfg.seed if rank == 0 else derive_seed(cfg.seed, PURPOSE_RANK, rank)
    distiller = Distiller(model, teacher, d, steps_per_epoch=spe, seed=seed, device=device)
    start_epoch, history, attempt = 0, [], 1
    if state is not None:
        restore_train_state(distiller, state)
        start_epoch = int(state["epoch"]) + 1
        history = list(state["history"])
        attempt = int(state["attempt"]) + 1
    shape = tuple(int(v) for v in config["image_shape"])
    per_worker = int(config["num_train"]) // world  # rows of each equal split
    if per_worker == 0:
        raise RuntimeError(f"{config['num_train']} training images cannot feed {world} Train workers")
    batch_size = min(d.batch_size, per_worker)
    shard = ray.train.get_dataset_shard("train")
    fail_once = config.get("fail_once")

    for epoch in range(start_epoch, d.epochs):
        if fail_once and epoch == int(fail_once[0]) and not Path(fail_once[1]).exists():
            Path(fail_once[1]).write_text(f"worker {rank} failed at epoch {epoch}\n")
            raise RuntimeError(f"{FAIL_ONCE_ENV}: simulated worker failure at epoch {epoch}")
        t0 = time.perf_counter()
        sums = torch.zeros(6, dtype=torch.float64)  # loss, kd, ce, agreement, steps, images
        lr = 0.0
        shuffle_seed = derive_seed(cfg.seed, PURPOSE_SHUFFLE, epoch, rank)
        for x, y in _batches(shard, spe, batch_size, shape, shuffle_seed):
            stats = distiller.step(x, y)
            sums += torch.tensor([stats.loss, stats.kd, stats.ce, stats.agreement, 1.0, x.shape[0]])
            lr = stats.lr
        seconds = time.perf_counter() - t0
        local_rate = float(sums[5]) / max(seconds, 1e-9)
        if world > 1 and dist.is_available() and dist.is_initialized():
            reduced = sums.to(device)  # NCCL reduces GPU tensors only
            dist.all_reduce(reduced)
            sums = reduced.cpu()
        steps = max(float(sums[4]), 1.0)
        row = {
            "loss": float(sums[0]) / steps,
            "kd": float(sums[1]) / steps,
            "ce": float(sums[2]) / steps,
            "agreement": float(sums[3]) / steps,
            "epoch": epoch,
            "lr": lr,
            "attempt": attempt,
            "workers": world,
        }
        history.append(row)
        _record_metrics(cfg, rank, row["loss"], local_rate)
        metrics = {**row, "samples_per_s": float(sums[5]) / max(seconds, 1e-9), "seconds": seconds}
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                torch.save(train_state(distiller, epoch, history, attempt), Path(tmp) / STATE_FILE)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)
