"""The training data on Ray: each Train worker's share of the shards, in memory or streamed by Ray Data.

**Read once** when a worker's share fits in memory (``ray.train_data: auto`` decides with
``ray.train_memory_gb``; ``memory`` forces it): the driver's plan names the rows of each worker
(:meth:`~pipeline.ray.train_plan.TrainPlan.worker_share`: an equal, contiguous part of the training
and of the held-out rows), and each worker reads them itself at start, straight from the shards'
row groups (:func:`~pipeline.ray.train_plan.read_by_index`, in a background thread while it builds
its student) into a resident tensor (pinned memory, or the GPU itself when the share fits there),
then runs every epoch from memory, shuffled per epoch exactly like the local executor; with one
worker its images and batches are the local executor's. No Ray Data pipeline is started for it
(a split coordinator actor and read tasks cost seconds of start-up for a single read).
Otherwise (``stream``) Ray Data splits the shards between the workers: every epoch is one pass over
the worker's split of the training rows from storage (randomized block order, prefetch, a local
shuffle buffer), and the held-out rows are streamed at each evaluation.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from intraq_core.distill import EpochBatches
from intraq_core.seeding import derive_seed
from pipeline.ray.train_plan import TrainPlan, read_by_index
from pipeline.storage.manifest import Manifest, pyarrow_dataset_source, shard_paths
from pipeline.storage.store import Storage

#: CPUs of each Ray Data read/filter task (fractional, beside the Train workers).
DATA_TASK_CPUS = 0.25
SHUFFLE_BUFFER_BATCHES = 4
PREFETCH_BATCHES = 2
#: A resident share goes on the GPU when it takes at most this fraction of the free GPU memory.
GPU_RESIDENT_FRACTION = 0.5
#: Seed purpose of the epoch shuffle and the stream's local shuffle of ranks > 0 (rank 0 uses the
#: run's seed, so one worker trains exactly like the local executor).
PURPOSE_SHUFFLE = 102
_DTYPES = {"image": torch.float32, "label": torch.int64, "index": torch.int64}


def data_config(plan: TrainPlan, manifest: Manifest) -> dict[str, Any]:
    """What a worker's :class:`WorkerData` needs of the plan (part of ``train_loop_config``).

    In ``memory`` mode: the shards, their ``index`` columns and every worker's rows
    (:meth:`~pipeline.ray.train_plan.TrainPlan.worker_share`), so each worker reads its own share.
    """
    out: dict[str, Any] = {
        "data": plan.data,
        "image_shape": list(manifest.image_shape),
        "num_train": plan.num_train,
        "num_holdout": int(plan.holdout_indices.size),
        "steps_per_epoch": plan.steps_per_epoch,
    }
    if plan.data == "memory":
        out["shards"] = shard_paths(manifest)
        out["per_shard"] = plan.per_shard
        out["shares"] = [plan.worker_share(rank) for rank in range(plan.workers)]
    return out


def ray_datasets(data: Storage, manifest: Manifest, plan: TrainPlan, seed: int) -> dict[str, Any] | None:
    """The Ray Datasets the workers split when streaming (training and held-out rows); None in ``memory`` mode."""
    if plan.data == "memory":
        return None
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
    held = [int(i) for i in plan.holdout_indices]
    train = ds.filter(expr=col("index").not_in(held), num_cpus=DATA_TASK_CPUS) if held else ds
    out = {"train": train.randomize_block_order(seed=seed % 2**32)}
    if held:
        out["holdout"] = ds.filter(expr=col("index").is_in(held), num_cpus=DATA_TASK_CPUS)
    return out


def split_config() -> Any:
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


class WorkerData:
    """This worker's share of the shards: resident tensors (``memory``) or per-epoch streams.

    In ``memory`` mode the one read starts at once in a background thread, so it overlaps the
    worker's other start-up work (teacher, student); :meth:`wait` joins it.
    """

    def __init__(
        self,
        config: dict[str, Any],
        rank: int,
        world: int,
        device: torch.device,
        batch: int,
        data: Storage,
    ) -> None:
        """``data``: where the shards are (the run's dataset storage); ``batch``: this worker's images per step."""
        self.mode = config["data"]
        self.shape = tuple(int(v) for v in config["image_shape"])
        self.batch, self.steps = batch, int(config["steps_per_epoch"])
        self.rank, self.device = rank, device
        self.seed = int(config["run_config"]["seed"])
        self.hold_x: torch.Tensor | None = None
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if self.mode == "memory":
            train_rows, hold_rows = config["shares"][rank]

            def load() -> None:
                try:
                    self.train_x, self.train_y, self.hold_x = self._read_once(
                        data, config["shards"], config["per_shard"], train_rows, hold_rows
                    )
                except BaseException as exc:  # re-raised by wait(), in the training thread
                    self._error = exc

            self._thread = threading.Thread(target=load, name="intraq-read-once", daemon=True)
            self._thread.start()
        else:
            import ray.train

            # An equal split of fewer rows than a batch still gives its one (partial) batch.
            self.drop_last = int(config["num_train"]) // world >= batch
            self.train_it = ray.train.get_dataset_shard("train")
            self.hold_it = ray.train.get_dataset_shard("holdout") if config["num_holdout"] else None

    def wait(self) -> WorkerData:
        """The data, once read (``memory``); raises what the read raised."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            raise self._error
        return self

    def _read_once(
        self,
        storage: Storage,
        paths: list[str],
        per_shard: list[np.ndarray],
        train_rows: np.ndarray,
        hold_rows: np.ndarray,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Read this worker's training and held-out rows once (in index order) and place them."""
        if train_rows.size == 0:
            raise RuntimeError("this Train worker's share of the data holds no training image")
        x, y = read_by_index(storage, paths, per_shard, self.shape, np.concatenate([train_rows, hold_rows]))
        n = train_rows.size
        nbytes = n * 4 * math.prod(self.shape)
        on_gpu = self.device.type == "cuda" and nbytes <= GPU_RESIDENT_FRACTION * torch.cuda.mem_get_info()[0]
        train_x, held_x = x[:n], (x[n:] if hold_rows.size else None)
        if self.device.type == "cuda":
            train_x = train_x.to(self.device) if on_gpu else train_x.pin_memory()
            held_x = held_x.clone() if held_x is not None else None  # frees the CPU copy of the training images
        return train_x, y[:n], held_x

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
