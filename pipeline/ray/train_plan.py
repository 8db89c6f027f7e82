"""The Ray driver's plan of a training, from the shards' ``index`` columns alone, and the rows it reads.

Before any worker starts, the driver reads only the ``index`` column of every shard: the held-out
split (:func:`pipeline.stages.holdout.split_mask`, so the same images as the local executor), the
steps per epoch, whether each worker's share fits in memory (``ray.train_data``), and, when it
does, which rows each worker holds (:meth:`TrainPlan.worker_share`). It then reads just the images
it calibrates on (:func:`read_images`); a worker reads its share the same way (:func:`read_by_index`:
only the row groups holding the rows).
"""

from __future__ import annotations

import concurrent.futures
import math
from collections.abc import Iterable

import numpy as np
import pyarrow.parquet as pq
import torch

from intraq_core.distill import steps_per_epoch
from pipeline.config import RunConfig
from pipeline.context import RunContext
from pipeline.stages.holdout import split_mask
from pipeline.storage.manifest import Manifest, pyarrow_dataset_source, shard_paths
from pipeline.storage.shards import read_examples
from pipeline.storage.store import Storage


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

    def worker_share(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """The global indices of the training and held-out rows worker ``rank`` holds in memory.

        An equal part (up to one row) of the training rows and one of the held-out rows, each a
        contiguous run of image indices in ascending order, so a worker reads about 1/N of the row
        groups, the split is the same in every run, and one worker holds exactly the local
        executor's training and held-out images in its order.
        """
        return (
            np.array_split(self.train_indices, self.workers)[rank],
            np.array_split(self.holdout_indices, self.workers)[rank],
        )

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
    data = ctx.dataset_storage
    fs, paths = pyarrow_dataset_source(data, manifest)
    per_shard = [pq.read_table(p, columns=["index"], filesystem=fs).column("index").to_numpy() for p in paths]
    plan = TrainPlan(ctx.cfg, manifest, per_shard)
    plan.check(ctx.cfg, data.url)
    return plan


def read_images(data: Storage, manifest: Manifest, plan: TrainPlan, wanted: np.ndarray) -> torch.Tensor:
    """Images of the given global indices, in that order, picked out of the shards (:func:`read_by_index`).

    So the driver reads the calibration images and not the dataset.
    """
    return read_by_index(data, shard_paths(manifest), plan.per_shard, manifest.image_shape, wanted)[0]


def read_by_index(
    data: Storage, paths: list[str], per_shard: list[np.ndarray], image_shape: Iterable[int], wanted: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and labels of the given global indices, in that order, out of the shards ``paths``
    (``per_shard``: each shard's ``index`` column).

    Only the row groups holding them are read (:func:`pipeline.storage.shards.read_examples`), the
    shards in parallel threads (object-storage latency).
    """
    shape = [int(v) for v in image_shape]
    out = np.empty((len(wanted), *shape), dtype=np.float32)
    labels = np.empty(len(wanted), dtype=np.int64)
    found = np.zeros(len(wanted), dtype=bool)
    jobs = []
    for path, shard_indices in zip(paths, per_shard, strict=True):
        sorter = np.argsort(shard_indices)
        pos = np.clip(np.searchsorted(shard_indices, wanted, sorter=sorter), 0, len(shard_indices) - 1)
        rows = sorter[pos]
        where = np.flatnonzero(shard_indices[rows] == wanted)
        if where.size:
            jobs.append((path, rows[where], where))
            found[where] = True
    if not found.all():
        missing = np.asarray(wanted)[~found][:5].tolist()
        raise ValueError(f"{data.url}: no shard holds image indices {missing}")
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, max(1, len(jobs)))) as pool:
        futures = [(where, pool.submit(read_examples, data, path, rows, shape)) for path, rows, where in jobs]
        for where, future in futures:
            out[where], labels[where] = future.result()
    return torch.from_numpy(out), torch.from_numpy(labels)
