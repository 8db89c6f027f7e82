"""Training stage on Ray: the driver of a ``TorchTrainer`` (Train V2) whose workers run the one training driver.

Same outputs as :func:`pipeline.stages.train.train_local` (``student_calibrated.pt``, ``student.pt``,
``train_history.json``, a :class:`~pipeline.stages.train.TrainOutcome`), split as follows:

* **Driver** (this process, e.g. the head node; it never needs a GPU). Plans the training from the
  shards' ``index`` columns (:mod:`pipeline.ray.train_plan`: the local executor's held-out split),
  reads only the calibration images (and the block reconstruction images with ``quant.method:
  reconstruct``), sets the student's quantization parameters on exactly the local executor's
  images and writes ``student_calibrated.pt``, which the workers read. It calibrates in a thread
  while ``fit()`` starts the worker group (the workers wait for that file, see
  :func:`~pipeline.ray.train_worker.wait_for_calibrated`), so neither waits for the other. The
  teacher it builds goes to the workers through the object store (:mod:`pipeline.ray.teacher`). It
  builds the outcome from the last epoch's report of rank 0
  (:meth:`~pipeline.stages.train.TrainOutcome.from_report`).
* **Workers** (:mod:`pipeline.ray.train_worker`): each runs :class:`~pipeline.stages.train.Training`
  on its share of the data (:mod:`pipeline.ray.train_data`: read once into memory by the worker
  itself, or streamed by Ray Data).
* **Checkpoints** every ``distill.checkpoint_every`` epochs and at the last, in the format of the
  local executor (one ``train_state.pt`` per Ray Train checkpoint), uploaded asynchronously
  (``CheckpointUploadMode.ASYNC``) while training continues. A restarted worker group
  (``FailureConfig(max_failures)``) and a ``--resume``d run (same ``RunConfig(name,
  storage_path)`` under ``<run>/ray_train``) continue after the last checkpoint.

Progress: rank 0 keeps a ``ray.experimental.tqdm_ray`` bar of epochs (with the loss, the
teacher agreement and the images per second of all workers), drawn on the driver's terminal
(:func:`pipeline.ray.train_worker.train_loop`). Workers record the ``intraq_distill_loss`` and
``intraq_distill_samples_per_s`` gauges (:mod:`pipeline.ray.metrics`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import RunConfig
from pipeline.context import RunContext
from pipeline.errors import one_line
from pipeline.ray.teacher import share_teacher
from pipeline.ray.train_data import DATA_TASK_CPUS, data_config, ray_datasets, split_config
from pipeline.ray.train_plan import plan_training, read_images
from pipeline.ray.train_worker import CALIBRATION_FAILED_PATH, FAIL_ONCE_ENV, train_loop
from pipeline.ray.user_code import with_user_code
from pipeline.stages.calibration import calibrate_student, calibration_positions, reconstruction_positions
from pipeline.stages.train import CALIBRATED_PATH, TrainOutcome, write_calibrated
from pipeline.stages.train_state import train_identity
from pipeline.storage.manifest import Manifest
from pipeline.storage.store import Storage

__all__ = ["RAY_TRAIN_DIR", "resolve_use_gpu", "train_ray", "train_run_name", "worker_config"]

log = logging.getLogger(__name__)

#: Folder of the run location holding Ray Train's experiment(s).
RAY_TRAIN_DIR = "ray_train"


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


def _check_capacity(cfg: RunConfig, workers: int, cpus: float) -> None:
    """Fail fast instead of hanging when streaming Train workers would leave no CPU for Ray Data tasks."""
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


def _fail_once_hook() -> tuple[int, str] | None:
    raw = os.environ.get(FAIL_ONCE_ENV)
    if not raw:
        return None
    epoch, _, marker = raw.partition(":")
    return int(epoch), marker


class _Calibration:
    """The driver's calibration of the student (``calibrate(teacher)``, then ``student_calibrated.pt``), run in a
    thread so that the Train worker group starts meanwhile; the workers wait for the file
    (:func:`~pipeline.ray.train_worker.wait_for_calibrated`), or for :data:`CALIBRATION_FAILED_PATH`
    when it fails."""

    def __init__(
        self, ctx: RunContext, calibrate: Callable[[torch.nn.Module], torch.nn.Module], teacher: torch.nn.Module
    ) -> None:
        self.error: BaseException | None = None
        self.sensitivity: list[dict[str, Any]] | None = None
        self._started = time.perf_counter()
        self._ended = self._started
        args = (ctx, calibrate, teacher)
        self._thread = threading.Thread(target=self._run, args=args, name="intraq-calibrate", daemon=True)
        self._thread.start()

    def _run(
        self, ctx: RunContext, calibrate: Callable[[torch.nn.Module], torch.nn.Module], teacher: torch.nn.Module
    ) -> None:
        try:
            student = calibrate(teacher)
            self.sensitivity = write_calibrated(ctx, student)
        except BaseException as exc:  # re-raised in the driver's thread
            self.error = exc
            try:
                reason = one_line(f"{type(exc).__name__}: {exc}")
                ctx.storage.write_bytes_atomic(CALIBRATION_FAILED_PATH, reason.encode())
            except Exception:
                log.exception("could not tell the Train workers that the calibration failed")
        finally:
            self._ended = time.perf_counter()

    def wait(self) -> tuple[float, float]:
        """Join; raises what the calibration raised; its seconds and its end (a ``perf_counter`` time)."""
        self._thread.join()
        if self.error is not None:
            raise self.error
        return self._ended - self._started, self._ended


def train_ray(ctx: RunContext, manifest: Manifest, *, progress: bool = True) -> TrainOutcome:
    """Calibrate on the driver, distil with a Ray ``TorchTrainer``; writes the students and history.

    Needs a running Ray (the CLI starts or joins one; see :mod:`pipeline.ray.session`).
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    t_start = time.time()
    cfg = ctx.cfg
    data = ctx.dataset_storage
    if "memory" in (ctx.storage.kind, data.kind):
        raise ValueError(
            "memory:// storage lives in one process; the ray executor needs a local path, file:// or s3://"
        )
    if not ray.is_initialized():
        raise RuntimeError("train_ray needs a running Ray (pipeline.ray.session.start_ray)")
    workers, cpus = cfg.ray.train_workers, cfg.ray.cpus_per_train_worker
    use_gpu = resolve_use_gpu(cfg)
    plan = plan_training(ctx, manifest)
    if plan.data == "stream":  # only streaming runs Ray Data tasks (memory shares are read by the workers)
        _check_capacity(cfg, workers, cpus)

    for stale in (CALIBRATED_PATH, CALIBRATION_FAILED_PATH):  # an earlier attempt's: the workers wait for ours
        if ctx.storage.exists(stale):
            ctx.storage.delete(stale)
    teacher = ctx.teacher()
    teacher_ref = share_teacher(ctx, teacher)  # pickled now, before calibration uses the teacher

    def calibrate(teacher: torch.nn.Module) -> torch.nn.Module:
        positions = [p.numpy() for p in calibration_positions(plan.num_train, ctx)]
        rec = reconstruction_positions(plan.num_train, ctx)
        rec_positions = rec.numpy() if rec is not None else np.zeros(0, dtype=np.int64)
        needed = np.unique(np.concatenate([*positions, rec_positions]))
        needed_x = read_images(data, manifest, plan, plan.train_indices[needed])
        batches = [needed_x[torch.from_numpy(np.searchsorted(needed, p))] for p in positions]
        images = needed_x[torch.from_numpy(np.searchsorted(needed, rec_positions))] if rec is not None else None
        return calibrate_student(ctx, teacher, batches, images, device=ctx.driver_device)

    calibration = _Calibration(ctx, calibrate, teacher)  # in a thread, while fit() below starts the worker group
    del teacher  # the thread holds it until it is done

    loop_config: dict[str, Any] = {
        "run_config": worker_config(cfg, ctx.storage),
        "storage": ctx.storage.config.model_copy(update={"url": ctx.storage.url}).model_dump(mode="json"),
        "identity": train_identity(ctx, manifest, plan.num_train),
        **data_config(plan, manifest),
        "cpus_per_worker": cpus,
        "teacher": teacher_ref,
        "teacher_sha256": ctx.teacher_sha256,
        "fail_once": _fail_once_hook(),
        "progress": progress,
    }
    fs, _ = ctx.storage.pyarrow_filesystem()
    trainer = TorchTrainer(
        train_loop,
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
            logging_config=LoggingConfig(log_level="WARNING"),
            worker_runtime_env=with_user_code(None, cfg.model, upload=True) or {},
        ),
        datasets=ray_datasets(data, manifest, plan, cfg.seed),
        dataset_config=split_config(),
    )
    try:
        result = trainer.fit()
    except Exception:
        if calibration.error is not None:  # the workers stopped because the calibration failed: say why
            raise calibration.error from None
        raise
    t2 = time.perf_counter()
    seconds_calibrate, t1 = calibration.wait()
    report = (result.metrics or {}).get("summary")
    if report is None:
        raise RuntimeError(f"Ray Train run {result.path} finished without reporting its last epoch")
    return TrainOutcome.from_report(
        cfg,
        report,
        num_train=plan.num_train,
        num_holdout=int(plan.holdout_indices.size),
        seconds_calibrate=seconds_calibrate,
        seconds_distill=t2 - t1,
        started=t_start,
        train_workers=workers,
        data=plan.data,
        sensitivity=calibration.sensitivity,
    )
