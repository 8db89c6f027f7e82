"""The training data on Ray: the Ray Datasets the Train workers split, and each worker's share of them.

**Read once** when a worker's share fits in memory (``ray.train_data: auto`` decides with
``ray.train_memory_gb``; ``memory`` forces it): each worker streams its equal split of the shards once
at start (``iter_torch_batches`` with prefetch; pinned memory, or the GPU itself when the share fits
there) into a resident tensor, separates its held-out rows, and runs every epoch from memory, shuffled
per epoch exactly like the local executor; with one worker its batches are the local executor's.
Otherwise (``stream``) every epoch is one pass over the worker's split of the training rows from
storage (randomized block order, prefetch, a local shuffle buffer), and the held-out rows are
streamed at each evaluation.
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
from pipeline.ray.train_plan import TrainPlan
from pipeline.storage.manifest import Manifest, pyarrow_dataset_source
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


def ray_datasets(data: Storage, manifest: Manifest, plan: TrainPlan, seed: int) -> dict[str, Any]:
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

    def wait(self) -> WorkerData:
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
