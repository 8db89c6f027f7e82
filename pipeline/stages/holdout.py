"""What the student is judged on without test data: the held-out split of the synthetic images and the selector.

A seeded hash of each image's global index holds it out of training (:func:`holdout_mask`), so the
split is the same for every executor and every number of workers, and known before any image
exists (:func:`training_images`). The data-free selector (:func:`make_selector`,
:mod:`intraq_core.selection`) scores the student on those images, their augmented views and the
probe set of ``distill.probe``, and keeps the best state; :func:`selection_outcome` reads the
held-out agreement of the starting and of the kept student off its scores.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from intraq_core.distill import distillation_selector
from intraq_core.seeding import derive_seed
from intraq_core.selection import Selection, Selector
from pipeline.context import RunContext
from pipeline.storage.manifest import Manifest
from pipeline.storage.shards import read_shard
from pipeline.storage.store import Storage

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


def selection_outcome(selection: Selection | None) -> tuple[dict[str, float] | None, dict[str, float] | None]:
    """Held-out (agreement, KL) of the starting and of the kept student, from the selector's scores."""
    if selection is None or not selection.evaluations or "holdout" not in selection.evaluations[0]:
        return None, None
    kept = next(e for e in selection.evaluations if e["epoch"] == selection.selected_epoch)
    return dict(selection.evaluations[0]["holdout"]), dict(kept["holdout"])
