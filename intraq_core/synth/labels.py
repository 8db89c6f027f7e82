"""Label plans: which class each synthetic image is optimized for."""

from __future__ import annotations

from typing import Literal

import torch

from intraq_core.seeding import PURPOSE_LABELS, derive_seed


def label_plan(
    num_images: int, num_classes: int, mode: Literal["balanced", "uniform"] = "balanced", seed: int = 0
) -> torch.Tensor:
    """Labels for ``num_images`` synthetic images.

    ``balanced`` (default): class counts differ by at most one. With at least one image per
    class it cycles through the classes (``i mod K``), so every batch cut from the plan is
    itself nearly class-balanced. With fewer images than classes (256 images of a 1,000-class
    ImageNet teacher, as in the IntraQ paper's Table 2) each image gets a different class: a
    seeded draw of ``num_images`` classes without replacement, in ascending order.
    ``uniform`` draws each label uniformly at random as the reference implementation does
    (``randint``, with replacement: classes may repeat and be missing at any image count).
    Both depend on ``seed`` only where they draw at random.
    """
    if num_images < 1 or num_classes < 1:
        raise ValueError(f"a label plan needs images and classes, got {num_images} images of {num_classes} classes")
    gen = torch.Generator().manual_seed(derive_seed(seed, PURPOSE_LABELS))
    if mode == "balanced":
        if num_images < num_classes:
            return torch.randperm(num_classes, generator=gen)[:num_images].sort().values
        return torch.arange(num_images, dtype=torch.int64) % num_classes
    if mode == "uniform":
        return torch.randint(0, num_classes, (num_images,), generator=gen, dtype=torch.int64)
    raise ValueError(f"unknown label plan '{mode}' (choose balanced or uniform)")
