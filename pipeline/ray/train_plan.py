"""The Ray driver's plan of a training, from the shards' ``index`` columns alone, and the rows it reads.

Before any worker starts, the driver reads only the ``index`` column of every shard: the held-out
split (:func:`pipeline.stages.holdout.split_mask`, so the same images as the local executor), the
steps per epoch, and whether each worker's share fits in memory (``ray.train_data``). It then reads
just the images it calibrates on (:func:`read_images`: only the row groups holding them).
"""

from __future__ import annotations

import concurrent.futures
import math

import numpy as np
import pyarrow.parquet as pq
import torch

from intraq_core.distill import steps_per_epoch
from pipeline.config import RunConfig
from pipeline.context import RunContext, dataset_storage
from pipeline.stages.holdout import split_mask
from pipeline.storage.manifest import Manifest, pyarrow_dataset_source, shard_paths
from pipeline.storage.shards import read_rows
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
