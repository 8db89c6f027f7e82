"""Training stage on Ray: a ``TorchTrainer`` (Train V2) runs the one training loop in every worker.

Same outputs as :func:`pipeline.stages.train.train_local` (``student_calibrated.pt``, ``student.pt``,
``train_history.json``, a :class:`~pipeline.stages.train.TrainOutcome`), split as follows:

* **Driver** (this process, e.g. the head node; it never needs a GPU). Reads only the ``index``
  column of every shard to compute the held-out split (:func:`pipeline.stages.train.holdout_mask`, so
  the same images as the local executor), and the calibration images, picked out of the shards
  (:func:`pipeline.storage.shards.read_rows`: only the row groups holding them), and the block
  reconstruction images with ``quant.method: reconstruct``. Sets the student's quantization
  parameters on exactly the local executor's images and writes ``student_calibrated.pt``,
  which the workers read.
* **Workers** (``ray.train_workers`` = N; gloo on CPU, NCCL on GPU). Each drives the same
  :func:`intraq_core.distill.train_epochs` as the local executor, with ``distill.batch_size / N``
  images per step: the global batch, steps per epoch and learning-rate schedule do not depend
  on N. DDP (``prepare_model``, N > 1) averages the gradients. Epoch statistics and the
  data-free selector's held-out scores (every ``distill.eval_every`` epochs, on the held-out
  images of each worker's split) are all-reduced, so every worker keeps the same best student.
* **Data is read once** when a worker's share fits in memory (``ray.train_data: auto`` decides
  with ``ray.train_memory_gb``; ``memory`` forces it): each worker streams its equal split of the
  shards once at start (``iter_torch_batches`` with prefetch; pinned memory, or the GPU itself
  when the share fits there) into a resident tensor, separates its held-out rows, and runs every
  epoch from memory, shuffled per epoch exactly like the local executor; with one worker its
  batches are the local executor's. Otherwise (``stream``) every epoch is one pass over the
  worker's split of the training rows from storage (randomized block order, prefetch, a local
  shuffle buffer), and the held-out rows are streamed at each evaluation.
* **Checkpoints** every ``distill.checkpoint_every`` epochs and at the last, in the format of the
  local executor (one ``train_state.pt`` per Ray Train checkpoint), uploaded asynchronously
  (``CheckpointUploadMode.ASYNC``) while training continues. A restarted worker group
  (``FailureConfig(max_failures)``) and a ``--resume``d run (same ``RunConfig(name,
  storage_path)`` under ``<run>/ray_train``) continue after the last checkpoint
  (``ray.train.get_checkpoint()``). Rank 0 writes the final student and history.

Progress: a driver-side tqdm bar of epochs, fed by a ``UserCallback`` (it runs in the Train
controller) through a zero-CPU ``ray.util.queue.Queue``. Workers record the
``intraq_distill_loss`` and ``intraq_distill_samples_per_s`` gauges (:mod:`pipeline.ray.metrics`).
"""

from __future__ import annotations

import itertools
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

from intraq_core.distill import Distiller, EpochBatches, steps_per_epoch, train_epochs
from intraq_core.models.checkpoint import safe_load
from intraq_core.quant import set_act_mode
from intraq_core.seeding import derive_seed
from intraq_core.selection import Selection
from intraq_core.student import build_student
from pipeline.config import RunConfig
from pipeline.context import RunContext, dataset_storage, limit_threads, state_dict_sha256
from pipeline.ray.user_code import with_user_code
from pipeline.stages.train import (
    CALIBRATED_PATH,
    TRAIN_STATE_PATH,
    TrainOutcome,
    calibrate_student,
    calibration_positions,
    make_selector,
    parse_train_state,
    reconstruction_positions,
    selection_outcome,
    split_mask,
    train_identity,
    train_state_bytes,
    write_calibrated,
    write_outputs,
)
from pipeline.storage.shards import Manifest, pyarrow_dataset_source, read_rows, shard_paths
from pipeline.storage.store import Storage, StorageConfig

__all__ = [
    "FAIL_ONCE_ENV",
    "RAY_TRAIN_DIR",
    "TrainPlan",
    "plan_training",
    "resolve_use_gpu",
    "train_ray",
    "train_run_name",
    "worker_config",
]

log = logging.getLogger(__name__)

#: Folder of the run location holding Ray Train's experiment(s).
RAY_TRAIN_DIR = "ray_train"
#: Test hook: ``"<epoch>:<marker file>"`` makes a worker raise once at the start of that epoch
#: (the marker file records that it did), after the checkpoints reported so far are committed.
#: Read on the driver, passed in ``train_loop_config``.
FAIL_ONCE_ENV = "INTRAQ_TEST_FAIL_ONCE"
#: CPUs of each Ray Data read/filter task (fractional, beside the Train workers).
DATA_TASK_CPUS = 0.25
SHUFFLE_BUFFER_BATCHES = 4
PREFETCH_BATCHES = 2
#: A resident share goes on the GPU when it takes at most this fraction of the free GPU memory.
GPU_RESIDENT_FRACTION = 0.5
# Seed purposes of ranks > 0 (rank 0 uses the run's seeds, so one worker trains exactly like
# the local executor): augmentation stream, epoch shuffle, and the stream's local shuffle.
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


def worker_config(cfg: RunConfig, storage: Storage) -> dict[str, Any]:
    """The config for workers, with local paths made absolute (Ray changes their working dir)."""
    data = cfg.to_dict()
    data["storage"]["url"] = storage.url
    weights = data["model"].get("weights")
    if weights and "://" not in weights and Path(weights).expanduser().exists():
        data["model"]["weights"] = str(Path(weights).expanduser().resolve())
    if data.get("dataset") and "://" not in data["dataset"]:
        data["dataset"] = str(Path(data["dataset"]).expanduser().resolve())
    probe = data["distill"].get("probe")
    if probe and "://" not in probe:
        data["distill"]["probe"] = str(Path(probe).expanduser().resolve())
    return data


# -- driver ----------------------------------------------------------------------------------


class TrainPlan:
    """What the driver decides before any worker starts, from the ``index`` columns alone."""

    def __init__(self, cfg: RunConfig, manifest: Manifest, per_shard: list[np.ndarray]) -> None:
        d, workers = cfg.distill, cfg.ray.train_workers
        self.per_shard = per_shard
        indices = np.concatenate(per_shard) if per_shard else np.zeros(0, dtype=np.int64)
        #: Global image indices in training order (ascending, like the local executor's).
        self.order = np.sort(indices)
        hold = split_mask(self.order, cfg.seed, d.holdout_fraction)
        self.train_indices = self.order[~hold]
        self.holdout_indices = self.order[hold]
        self.num_train = int(self.train_indices.size)
        self.workers = workers
        self.steps_per_epoch = steps_per_epoch(self.num_train, d)
        self.worker_batch = d.batch_size // workers
        row_bytes = 4 * math.prod(manifest.image_shape)
        self.share_bytes = math.ceil(indices.size / workers) * row_bytes
        mode = cfg.ray.train_data
        if mode == "auto":
            mode = "memory" if self.share_bytes <= cfg.ray.train_memory_gb * 2**30 else "stream"
        self.data = mode

    def check(self, cfg: RunConfig, where: str) -> None:
        """One-line errors for plans that cannot run (before any worker starts)."""
        d, n = cfg.distill, self.workers
        if self.num_train == 0:
            raise ValueError(f"{where} holds no training images")
        if self.num_train // n == 0:
            raise ValueError(f"{self.num_train} training images cannot feed {n} Train workers")
        if self.data == "stream":
            one_pass = (self.num_train // n) // self.worker_batch if self.num_train >= d.batch_size else 1
            if d.iterations_per_epoch is not None and d.iterations_per_epoch > one_pass:
                raise ValueError(
                    f"distill.iterations_per_epoch={d.iterations_per_epoch}, but streaming from storage "
                    f"(ray.train_data=stream) an epoch is one pass over the data: at most {one_pass} steps of "
                    f"{d.batch_size} images; lower or unset distill.iterations_per_epoch, or keep the data in "
                    f"memory (ray.train_data=memory; each worker needs {self.share_bytes / 2**30:.2f} GiB)"
                )


def plan_training(ctx: RunContext, manifest: Manifest) -> TrainPlan:
    """The :class:`TrainPlan` of ``manifest`` (reads only the ``index`` column of each shard)."""
    data = dataset_storage(ctx)
    fs, paths = pyarrow_dataset_source(data, manifest)
    per_shard = [pq.read_table(p, columns=["index"], filesystem=fs).column("index").to_numpy() for p in paths]
    plan = TrainPlan(ctx.cfg, manifest, per_shard)
    plan.check(ctx.cfg, data.url)
    return plan


def read_images(data: Storage, manifest: Manifest, plan: TrainPlan, wanted: np.ndarray) -> torch.Tensor:
    """Images of the given global indices, in that order, picked out of the shards.

    Only the row groups holding them are read (:func:`pipeline.storage.shards.read_rows`), the shards in
    parallel threads (object-storage latency), so the driver reads the calibration images and
    not the dataset.
    """
    import concurrent.futures

    shape = list(manifest.image_shape)
    out = np.empty((len(wanted), *shape), dtype=np.float32)
    jobs = []
    for path, shard_indices in zip(shard_paths(manifest), plan.per_shard, strict=True):
        sorter = np.argsort(shard_indices)
        pos = np.clip(np.searchsorted(shard_indices, wanted, sorter=sorter), 0, len(shard_indices) - 1)
        rows = sorter[pos]
        where = np.flatnonzero(shard_indices[rows] == wanted)
        if where.size:
            jobs.append((path, rows[where], where))
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, max(1, len(jobs)))) as pool:
        futures = [(where, pool.submit(read_rows, data, path, rows, shape)) for path, rows, where in jobs]
        for where, future in futures:
            out[where] = future.result()
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


def _datasets(data: Storage, manifest: Manifest, plan: TrainPlan, seed: int) -> dict[str, Any]:
    """The Ray Datasets the workers split: everything (``memory``), or training and held-out rows."""
    import ray.data
    from ray.data.expressions import col

    fs, paths = pyarrow_dataset_source(data, manifest)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the driver's epoch bar is the progress display
    ctx.print_on_execution_start = False
    ds = ray.data.read_parquet(
        paths,
        filesystem=fs,
        num_cpus=DATA_TASK_CPUS,
    ).select_columns(["image", "label", "index"])
    if plan.data == "memory":
        return {"all": ds}
    held = [int(i) for i in plan.holdout_indices]
    train = ds.filter(expr=col("index").not_in(held), num_cpus=DATA_TASK_CPUS) if held else ds
    out = {"train": train.randomize_block_order(seed=seed % 2**32)}
    if held:
        out["holdout"] = ds.filter(expr=col("index").is_in(held), num_cpus=DATA_TASK_CPUS)
    return out


def _data_config() -> Any:
    """Splits for the workers: equal shares of the training data (every worker takes the same
    number of steps, or DDP would hang), and each held-out row to exactly one worker."""
    from ray.train import DataConfig

    class SplitConfig(DataConfig):
        def configure(
            self,
            datasets: dict[str, Any],
            world_size: int,
            worker_handles: Any,
            worker_node_ids: Any,
            **kwargs: Any,
        ) -> list[dict[str, Any]]:
            output: list[dict[str, Any]] = [{} for _ in range(world_size)]
            for name, ds in datasets.items():
                ds = ds.copy(ds)
                options = self.default_ingest_options()
                options.preserve_order = True  # one worker then reads the rows in shard order
                ds.context.execution_options = options
                equal = name != "holdout"
                for rank, split in enumerate(
                    ds.streaming_split(world_size, equal=equal, locality_hints=worker_node_ids)
                ):
                    output[rank][name] = split
            return output

    return SplitConfig()


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
    """Calibrate on the driver, distil with a Ray ``TorchTrainer``; writes the students and history.

    Needs a running Ray (the CLI starts or joins one; see :mod:`pipeline.ray.session`).
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    t_start, t_start_unix = time.perf_counter(), time.time()
    cfg = ctx.cfg
    data = dataset_storage(ctx)
    if "memory" in (ctx.storage.kind, data.kind):
        raise ValueError(
            "memory:// storage lives in one process; the ray executor needs a local path, file:// or s3://"
        )
    if not ray.is_initialized():
        raise RuntimeError("train_ray needs a running Ray (pipeline.ray.session.start_ray)")
    workers, cpus = cfg.ray.train_workers, cfg.ray.cpus_per_train_worker
    use_gpu = resolve_use_gpu(cfg)
    _check_capacity(cfg, workers, cpus)
    plan = plan_training(ctx, manifest)

    t0 = time.perf_counter()
    positions = [p.numpy() for p in calibration_positions(plan.num_train, ctx)]
    rec = reconstruction_positions(plan.num_train, ctx)
    rec_positions = rec.numpy() if rec is not None else np.zeros(0, dtype=np.int64)
    needed = np.unique(np.concatenate([*positions, rec_positions]))
    needed_x = read_images(data, manifest, plan, plan.train_indices[needed])
    batches = [needed_x[torch.from_numpy(np.searchsorted(needed, p))] for p in positions]
    images = needed_x[torch.from_numpy(np.searchsorted(needed, rec_positions))] if rec is not None else None
    student = calibrate_student(ctx, ctx.teacher(), batches, images, device=ctx.driver_device)
    del needed_x, batches, images
    write_calibrated(ctx, student)
    t1 = time.perf_counter()

    loop_config: dict[str, Any] = {
        "run_config": worker_config(cfg, ctx.storage),
        "storage": ctx.storage.config.model_copy(update={"url": ctx.storage.url}).model_dump(mode="json"),
        "identity": train_identity(ctx, manifest, plan.num_train),
        "image_shape": list(manifest.image_shape),
        "rows": int(plan.order.size),
        "num_train": plan.num_train,
        "num_holdout": int(plan.holdout_indices.size),
        "holdout": plan.holdout_indices,
        "steps_per_epoch": plan.steps_per_epoch,
        "data": plan.data,
        "cpus_per_worker": cpus,
        "teacher_sha256": ctx.teacher_sha256,
        "fail_once": _fail_once_hook(),
    }
    fs, _ = ctx.storage.pyarrow_filesystem()
    bar = _Progress(cfg.distill.epochs, progress)
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cpus},
            placement_strategy=cfg.ray.train_placement.upper(),
        ),
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
        datasets=_datasets(data, manifest, plan, cfg.seed),
        dataset_config=_data_config(),
    )
    with bar:
        result = trainer.fit()
    t2 = time.perf_counter()
    summary = (result.metrics or {}).get("summary")
    if summary is None:
        raise RuntimeError(f"Ray Train run {result.path} finished without reporting its last epoch")
    if summary.get("selection") is not None and not summary["selection"]["kept_final"]:
        log.info("%s", Selection.from_summary(summary["selection"]).message)  # the summary line says it
    loop_start = summary.get("loop_start_unix")
    return TrainOutcome(
        plan.num_train,
        int(plan.holdout_indices.size),
        summary["agreement_calibrated"],
        summary["agreement_final"],
        list(summary["history"]),
        t1 - t0,
        t2 - t1,
        train_workers=workers,
        global_batch_size=cfg.distill.batch_size,
        steps_per_epoch=plan.steps_per_epoch,
        optimizer_steps=int(summary["optimizer_steps"]),
        startup_s=(loop_start - t_start_unix) if loop_start else time.perf_counter() - t_start,
        epoch_seconds=list(summary.get("epoch_seconds") or []),
        data=plan.data,
        device=str(summary.get("device", "cpu")),
        selection=summary.get("selection"),
    )


# -- workers ---------------------------------------------------------------------------------


class _Collective:
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


_DTYPES = {"image": torch.float32, "label": torch.int64, "index": torch.int64}


class _WorkerData:
    """This worker's share of the shards: resident tensors (``memory``) or per-epoch streams.

    In ``memory`` mode the one read starts at once in a background thread, so it overlaps the
    worker's other start-up work (teacher, student); :meth:`wait` joins it.
    """

    def __init__(self, config: dict[str, Any], rank: int, world: int, device: torch.device, batch: int) -> None:
        import ray.train

        self.mode = config["data"]
        self.shape = tuple(int(v) for v in config["image_shape"])
        self.batch, self.steps = batch, int(config["steps_per_epoch"])
        self.rank, self.device = rank, device
        self.seed = int(config["run_config"]["seed"])
        self.hold_x: torch.Tensor | None = None
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if self.mode == "memory":
            shard = ray.train.get_dataset_shard("all")
            holdout, capacity = np.asarray(config["holdout"]), int(config["rows"]) // world

            def load() -> None:
                try:
                    self.train_x, self.train_y, self.hold_x = self._read_once(shard, holdout, capacity)
                except BaseException as exc:  # re-raised by wait(), in the training thread
                    self._error = exc

            self._thread = threading.Thread(target=load, name="intraq-read-once", daemon=True)
            self._thread.start()
        else:
            # An equal split of fewer rows than a batch still gives its one (partial) batch.
            self.drop_last = int(config["num_train"]) // world >= batch
            self.train_it = ray.train.get_dataset_shard("train")
            self.hold_it = ray.train.get_dataset_shard("holdout") if config["num_holdout"] else None

    def wait(self) -> _WorkerData:
        """The data, once read (``memory``); raises what the read raised."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            raise self._error
        return self

    def _read_once(
        self, it: Any, holdout: np.ndarray, capacity: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Stream the split once into memory; split off its held-out rows; order by image index."""
        nbytes = max(capacity, 1) * 4 * math.prod(self.shape)
        on_gpu = self.device.type == "cuda" and nbytes <= GPU_RESIDENT_FRACTION * torch.cuda.mem_get_info()[0]
        where = self.device if on_gpu else torch.device("cpu")
        pin = self.device.type == "cuda" and not on_gpu
        x = torch.empty((capacity, *self.shape), dtype=torch.float32, device=where, pin_memory=pin)
        y = torch.empty(capacity, dtype=torch.int64)
        index = np.empty(capacity, dtype=np.int64)
        hold_x: list[torch.Tensor] = []
        hold_i: list[np.ndarray] = []
        n = 0
        for batch in it.iter_torch_batches(
            batch_size=max(self.batch, 256),
            prefetch_batches=PREFETCH_BATCHES,
            dtypes=_DTYPES,
            device=where,
            pin_memory=pin,
        ):
            images = batch["image"].reshape(-1, *self.shape)
            idx = batch["index"].cpu().numpy()
            held = np.isin(idx, holdout)
            keep = torch.from_numpy(~held)
            if held.any():
                hold_x.append(images[torch.from_numpy(held).to(images.device)].cpu())
                hold_i.append(idx[held])
            k = int(keep.sum())
            if n + k > capacity:  # more rows than an equal split should give: grow
                extra = n + k - capacity
                x = torch.cat([x, torch.empty((extra, *self.shape), dtype=x.dtype, device=x.device)])
                y = torch.cat([y, torch.empty(extra, dtype=y.dtype)])
                index = np.concatenate([index, np.empty(extra, dtype=np.int64)])
                capacity = n + k
            x[n : n + k] = images[keep.to(images.device)]
            y[n : n + k] = batch["label"].cpu()[keep]
            index[n : n + k] = idx[~held]
            n += k
        x, y, index = x[:n], y[:n], index[:n]
        if n > 1 and not (np.diff(index) > 0).all():
            order = torch.from_numpy(np.argsort(index, kind="stable"))
            x, y = x[order.to(x.device)], y[order]
        held_x = None
        if hold_x:
            held_idx = np.concatenate(hold_i)
            held_x = torch.cat(hold_x)[torch.from_numpy(np.argsort(held_idx, kind="stable"))]
        if n == 0:
            raise RuntimeError("this Train worker's share of the data holds no training image")
        return x, y, held_x

    def batches(self) -> Any:
        """``batches(epoch)`` for :func:`intraq_core.distill.train_epochs`."""
        seed = self.seed if self.rank == 0 else derive_seed(self.seed, PURPOSE_SHUFFLE, self.rank)
        if self.mode == "memory":
            return EpochBatches(self.train_x, self.train_y, self.batch, steps=self.steps, seed=seed)
        return lambda epoch: self._stream(epoch, seed)

    def _stream(self, epoch: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        produced = 0
        for batch in self.train_it.iter_torch_batches(
            batch_size=self.batch,
            drop_last=self.drop_last,
            prefetch_batches=PREFETCH_BATCHES,
            local_shuffle_buffer_size=self.batch * SHUFFLE_BUFFER_BATCHES,
            local_shuffle_seed=derive_seed(seed, PURPOSE_SHUFFLE, epoch) % 2**32,
            dtypes=_DTYPES,
            device=self.device,
        ):
            if produced == self.steps:
                continue  # drain the pass (every worker's split ends together), train no more
            yield batch["image"].reshape(-1, *self.shape), batch["label"]
            produced += 1
        if produced != self.steps:
            raise RuntimeError(
                f"this Train worker's pass over its split gave {produced} batches of {self.batch}, "
                f"expected {self.steps}"
            )

    def holdout(self) -> Iterator[torch.Tensor]:
        """This worker's held-out images (resident, or one streamed pass)."""
        if self.mode == "memory":
            if self.hold_x is not None:
                yield self.hold_x
            return
        if self.hold_it is None:
            return
        for batch in self.hold_it.iter_torch_batches(
            batch_size=500, prefetch_batches=PREFETCH_BATCHES, dtypes=_DTYPES, device="cpu"
        ):
            yield batch["image"].reshape(-1, *self.shape)


def _record_metrics(cfg: RunConfig, rank: int, loss: float, samples_per_s: float) -> None:
    try:
        from pipeline.ray.metrics import DISTILL_LOSS, DISTILL_SAMPLES_PER_S
    except ImportError:  # metrics are optional
        return
    DISTILL_LOSS.set(loss, run=cfg.name, worker=str(rank))
    DISTILL_SAMPLES_PER_S.set(samples_per_s, run=cfg.name, worker=str(rank))


def _train_loop(config: dict[str, Any]) -> None:
    """Per-worker: load the calibrated student (or resume), read the data, run the training loop."""
    import ray.train
    import ray.train.torch as rt
    from ray.train import CheckpointUploadMode
    from ray.train.v2.api.report_config import CheckpointConsistencyMode

    cfg = RunConfig.model_validate(config["run_config"])
    storage = Storage.from_config(StorageConfig.model_validate(config["storage"]))
    ctx = RunContext(cfg, storage)
    limit_threads(max(1, math.floor(config["cpus_per_worker"])))
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = rt.get_device()
    d = cfg.distill
    data = _WorkerData(config, rank, world, device, d.batch_size // world)  # the read starts now
    teacher = ctx.teacher()
    if state_dict_sha256(teacher) != config["teacher_sha256"]:
        raise RuntimeError(
            f"Train worker {rank} resolved a different teacher than the driver (sha256 "
            f"{config['teacher_sha256'][:12]}): check model.weights on every node"
        )
    teacher = teacher.to(device)
    student = build_student(teacher, cfg.quant)
    calibrated = safe_load(storage.read_bytes(CALIBRATED_PATH), what=storage.join(CALIBRATED_PATH))
    student.load_state_dict(calibrated["state_dict"])
    set_act_mode(student, "frozen")
    student = student.to(device).eval()

    data.wait()
    reduce = _Collective(world, device)
    # Scores the bare module (no DDP collective per forward) on every worker's held-out rows.
    selector = make_selector(
        ctx, teacher, data.holdout if int(config["num_holdout"]) > 0 else None, device=device, reduce=reduce
    )

    identity = config["identity"]
    state = None
    resumed = ray.train.get_checkpoint()
    if resumed is not None:
        with resumed.as_directory() as tmp:
            state = parse_train_state((Path(tmp) / TRAIN_STATE_PATH).read_bytes(), identity, resumed.path)
    # BN statistics and activation ranges are frozen buffers: synced once at wrap, never per forward.
    model = rt.prepare_model(student, parallel_strategy_kwargs={"forward_sync_buffers": False})
    seed = cfg.seed if rank == 0 else derive_seed(cfg.seed, PURPOSE_RANK, rank)
    distiller = Distiller(model, teacher, d, steps_per_epoch=int(config["steps_per_epoch"]), seed=seed, device=device)
    first, history, attempt = 0, [], 1
    if state is not None:
        distiller.load_state_dict(state["distiller"])
        if rank > 0:  # its own augmentation stream, not rank 0's saved one
            distiller.generator.manual_seed(derive_seed(cfg.seed, PURPOSE_RANK, rank, distiller.step_count))
        first, history = int(state["epoch"]) + 1, list(state["history"])
        attempt = int((state.get("extra") or {}).get("attempt", 0)) + 1
        if selector is not None and state.get("selector") is not None:
            selector.load_state(state["selector"])
    fail_once = config.get("fail_once")
    marks: list[float] = []
    pending: list[Any] = []

    def before_epoch(epoch: int) -> None:
        if fail_once and epoch == int(fail_once[0]) and not Path(fail_once[1]).exists():
            ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)
            Path(fail_once[1]).write_text(f"worker {rank} failed at epoch {epoch}\n")
            raise RuntimeError(f"{FAIL_ONCE_ENV}: simulated worker failure at epoch {epoch}")
        if not marks:
            marks.append(time.time())

    def checkpoint(epoch: int, dist_: Distiller, rows: list[dict[str, Any]]) -> None:
        folder = tempfile.mkdtemp(prefix="intraq-ckpt-")  # Ray deletes it once uploaded
        if rank == 0:
            raw = train_state_bytes(identity, epoch, rows, dist_, extra={"attempt": attempt}, selector=selector)
            (Path(folder) / TRAIN_STATE_PATH).write_bytes(raw)
        pending.append(ray.train.Checkpoint.from_directory(folder))

    def on_epoch(epoch: int, dist_: Distiller, rows: list[dict[str, Any]]) -> None:
        marks.append(time.time())
        seconds = marks[-1] - marks[-2]
        row = rows[-1]
        rate = data.batch * data.steps / max(seconds, 1e-9)
        _record_metrics(cfg, rank, row["loss"], rate)
        metrics: dict[str, Any] = {**row, "samples_per_s": rate * world, "seconds": seconds}
        if epoch == d.epochs - 1:
            selection = selector.selection if selector is not None else None  # chosen in the loop
            agree0, agree1 = selection_outcome(selection)
            metrics["summary"] = {
                "history": rows,
                "agreement_calibrated": agree0,
                "agreement_final": agree1,
                "selection": selection.summary() if selection is not None else None,
                "optimizer_steps": dist_.step_count,
                "loop_start_unix": marks[0],
                "epoch_seconds": [b - a for a, b in itertools.pairwise(marks)],
                "device": str(device),
            }
        ckpt = pending.pop() if pending else None
        mode = CheckpointUploadMode.ASYNC if ckpt is not None else CheckpointUploadMode.SYNC
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_upload_mode=mode)

    rows = train_epochs(
        distiller,
        data.batches(),
        first_epoch=first,
        history=history,
        reduce=reduce,
        selector=selector,
        before_epoch=before_epoch,
        checkpoint=checkpoint,
        on_epoch=on_epoch,
        tags={"attempt": attempt, "workers": world},
    ).epochs
    if rank == 0:
        write_outputs(ctx, distiller.module, rows)
