"""Label plans: which class each synthetic image is optimized for."""

from __future__ import annotations

from typing import Literal

import torch

from intraq_core.seeding import PURPOSE_LABELS, derive_seed


def label_plan(
    num_images: int, num_classes: int, mode: Literal["balanced", "uniform"] = "balanced", seed: int = 0
) -> torch.Tensor:
    """Labels for ``num_images`` synthetic images.

    ``balanced`` (default) cycles through the classes (``i mod K``), so every batch cut
    from the plan is itself nearly class-balanced; ``uniform`` draws each label uniformly
    at random as the reference implementation does (``randint``).
    """
    if num_images < num_classes:
        raise ValueError(
            f"number of images ({num_images}) is smaller than the number of classes ({num_classes}): "
            "every class needs at least one image"
        )
    if mode == "balanced":
        return torch.arange(num_images, dtype=torch.int64) % num_classes
    if mode == "uniform":
        gen = torch.Generator().manual_seed(derive_seed(seed, PURPOSE_LABELS))
        return torch.randint(0, num_classes, (num_images,), generator=gen, dtype=torch.int64)
    raise ValueError(f"unknown label plan '{mode}' (choose balanced or uniform)")
