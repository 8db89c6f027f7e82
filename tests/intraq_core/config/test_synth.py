"""SynthConfig.for_classes: the plan a many-class teacher gets (generate.min_images_per_class)."""

from __future__ import annotations

import pytest

from intraq_core.config import SynthConfig


@pytest.mark.parametrize(
    ("images", "batch", "iterations", "per_class", "classes", "expected"),
    [
        # The shipped ImageNet CPU budget, 512 x 120, for 1,000 classes at one image per class.
        (512, 256, 120, 1.0, 1000, (1024, 60)),
        # CIFAR budget 1,280 x 150 for 100 classes at 25 per class: 2,500 -> 2,560 (10 batches), 75 it.
        (1280, 256, 150, 25.0, 100, (2560, 75)),
        # Already enough: 1,280 images of 10 classes at 25 per class need 250.
        (1280, 256, 150, 25.0, 10, (1280, 150)),
        # Half an image per class of 1,000 is 500: 512 already is.
        (512, 256, 120, 0.5, 1000, (512, 120)),
        # Off.
        (64, 32, 10, 0.0, 1000, (64, 10)),
        # Iterations never below one: 10 x 1 raised to 100 images.
        (10, 10, 1, 1.0, 100, (100, 1)),
        # 1.1 x 100 is 110.00000000000001 in floats and must not round up to 111: 55 -> 110 images, 55 x 6 / 110 = 3.
        (55, 1, 6, 1.1, 100, (110, 3)),
    ],
)
def test_for_classes_keeps_the_image_iteration_budget(
    images: int, batch: int, iterations: int, per_class: float, classes: int, expected: tuple[int, int]
) -> None:
    cfg = SynthConfig(num_images=images, batch_size=max(batch, 2), iterations=iterations)
    # batch_size >= 2 in a config; 1 here so that the float rounding of the floor shows in the count.
    cfg = cfg.model_copy(update={"batch_size": batch, "min_images_per_class": per_class})
    plan = cfg.for_classes(classes)
    assert (plan.num_images, plan.iterations) == expected
    assert plan.for_classes(classes) == plan  # applying it twice changes nothing
    if expected == (images, iterations):
        assert plan is cfg
    others = {k: v for k, v in cfg.model_dump().items() if k not in ("num_images", "iterations")}
    assert others == {k: v for k, v in plan.model_dump().items() if k not in ("num_images", "iterations")}


def test_for_classes_rounds_up_to_whole_batches() -> None:
    plan = SynthConfig(num_images=10, batch_size=64, iterations=1000, min_images_per_class=1.0).for_classes(100)
    assert (plan.num_images, plan.iterations) == (128, 78)  # 100 -> 2 batches of 64; 10 x 1000 / 128 = 78.1


def test_for_classes_never_trades_iterations_below_the_floor() -> None:
    """2,048 x 30 lost 6 points to 512 x 120 on the shared ImageNet model: a budget too small for the
    floor grows only as far as RULE_MIN_ITERATIONS (60) allows, in whole batches."""
    cfg = SynthConfig(num_images=512, batch_size=256, iterations=120, min_images_per_class=2.0)
    plan = cfg.for_classes(1000)  # 2,000 -> 2,048 images would get 30 iterations
    assert (plan.num_images, plan.iterations) == (1024, 60)
    # 512 x 100: 51,200 / 60 = 853 -> 768 images (3 batches) x 67 iterations.
    plan = cfg.model_copy(update={"iterations": 100}).for_classes(1000)
    assert (plan.num_images, plan.iterations) == (768, 67)
    # No room at all (256 x 60 already at the floor): the plan stays as it is.
    small = SynthConfig(num_images=256, batch_size=256, iterations=60, min_images_per_class=1.0)
    assert small.for_classes(1000) is small
    # A config that already runs fewer iterations than the floor is not capped by it.
    plan = SynthConfig(num_images=64, batch_size=64, iterations=20, min_images_per_class=1.0).for_classes(1000)
    assert (plan.num_images, plan.iterations) == (1024, 1)
